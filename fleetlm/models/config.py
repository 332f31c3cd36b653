"""Model architecture configuration, and how it is resolved from a name or a config.json."""

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from fleetlm.arguments import MODEL_OVERRIDE_KEYS, ConfigError, ModelArguments


@dataclass
class ModelConfig:
    """Architecture of one decoder-only model; field names follow Hugging Face's config.json."""

    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: Optional[int] = None  # None: same as num_attention_heads (no grouped-query attention)
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6  # epsilon of every norm layer, RMSNorm or LayerNorm
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: Optional[int] = 1
    eos_token_id: Optional[int] = 2
    # Family switches; the defaults are LLaMA's. See the registry for the values of each family.
    norm_type: str = "rmsnorm"  # "rmsnorm" or "layernorm" (LayerNorm with bias)
    pre_norm: bool = True  # False: post-norm blocks, norm(x + f(x)) (OPT-350m's do_layer_norm_before=false)
    hidden_act: str = "silu"  # "silu", "gelu" (erf), "gelu_new" (tanh approximation) or "relu"
    gated_mlp: bool = True  # down(act(gate(x)) * up(x)) (SwiGLU, GeGLU); False: down(act(up(x)))
    mlp_bias: bool = False
    attention_bias: bool = False  # bias on the query, key and value projections
    attention_out_bias: bool = False  # bias on the attention output projection
    position_embedding_type: str = "rope"  # "rope", "alibi" or "learned" (absolute, added to the input)
    partial_rotary_factor: float = 1.0  # fraction of each head's dimensions that rotary rotates (ChatGLM2: 0.5)
    rope_interleaved: bool = False  # rotate pairs (x[2i], x[2i+1]) instead of LLaMA's (x[i], x[i + d/2])
    position_encoding_2d: bool = False  # GLM's 2D rotary: half the head by position, half by block position
    position_offset: int = 0  # learned positions: index of position 0 in the table (OPT: 2)
    embedding_layernorm: bool = False  # LayerNorm right after the token embedding (BLOOM)
    word_embed_proj_dim: Optional[int] = None  # token embedding width when it differs from hidden_size (OPT-350m)
    norm_head: bool = False  # output layer with L2-normalised rows per vocabulary entry (Baichuan2)
    # Run-time switches, not part of the architecture; set from ModelArguments/TrainingArguments.
    use_flash_attention: bool = field(default=False, metadata={"runtime": True})
    use_fused_rms_norm: bool = field(default=False, metadata={"runtime": True})
    use_fused_rope: bool = field(default=False, metadata={"runtime": True})
    use_fused_swiglu: bool = field(default=False, metadata={"runtime": True})
    hidden_dropout_prob: float = field(default=0.0, metadata={"runtime": True})
    attention_probs_dropout_prob: float = field(default=0.0, metadata={"runtime": True})
    recompute: bool = field(default=False, metadata={"runtime": True})
    recompute_granularity: str = field(default="full", metadata={"runtime": True})

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate(self) -> None:
        """Reject an architecture that cannot be built, naming the fields involved."""
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"Model config {name}={value!r}: must be a positive integer.")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}."
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not divisible by "
                f"num_key_value_heads={self.num_key_value_heads}; grouped-query attention needs whole groups."
            )
        choices = {
            "model_type": (self.model_type, SUPPORTED_MODEL_TYPES),
            "norm_type": (self.norm_type, ("rmsnorm", "layernorm")),
            "hidden_act": (self.hidden_act, ("silu", "gelu", "gelu_new", "relu")),
            "position_embedding_type": (self.position_embedding_type, ("rope", "alibi", "learned")),
        }
        for name, (value, allowed) in choices.items():
            if value not in allowed:
                raise ConfigError(f"Model config {name}={value!r} is not one of {', '.join(map(repr, allowed))}.")
        if self.position_embedding_type == "rope":
            rotary_dim = self.rotary_dim
            if rotary_dim < 2 or rotary_dim % 2 or rotary_dim > self.head_dim:
                raise ConfigError(
                    f"rotary dimension {rotary_dim} (head_dim={self.head_dim} x partial_rotary_factor="
                    f"{self.partial_rotary_factor}{' / 2 for 2D positions' if self.position_encoding_2d else ''}) "
                    "must be even and between 2 and head_dim."
                )
        if self.word_embed_proj_dim is not None and self.word_embed_proj_dim < 1:
            raise ConfigError(f"Model config word_embed_proj_dim={self.word_embed_proj_dim}: must be positive or null.")

    @property
    def rotary_dim(self) -> int:
        """Dimensions of each head that one rotary table rotates (GLM's 2D rotary uses two tables)."""
        dim = int(self.head_dim * self.partial_rotary_factor)
        return dim // 2 if self.position_encoding_2d else dim

    def architecture_dict(self) -> Dict[str, Any]:
        """Return the architecture fields (no run-time switches), as written to config.json."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.metadata.get("runtime")}

    @classmethod
    def from_dict(cls, values: Dict[str, Any], source: str) -> "ModelConfig":
        """Build from fleetlm's architecture fields (``architecture_dict``); unknown keys are ignored."""
        known = {f.name for f in dataclasses.fields(cls) if not f.metadata.get("runtime")}
        picked = {k: v for k, v in values.items() if k in known}
        if "model_type" in values and values["model_type"] not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{source}: model_type '{values['model_type']}' is not supported; "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}."
            )
        return cls(**picked)


# fleetlm's families. llama.py builds the first four, gpt.py the next three, chatglm.py the last two.
SUPPORTED_MODEL_TYPES = ("llama", "baichuan", "qwen", "chatglm2", "gpt", "opt", "bloom", "chatglm", "glm")


def config_from_json(values: Dict[str, Any], source: str) -> ModelConfig:
    """Build a ModelConfig from a config.json: a fleetlm checkpoint's, fleetlm's own, or Hugging Face's."""
    from fleetlm.models.hf_configs import HF_MODEL_TYPES, config_from_hf

    if isinstance(values.get("model"), dict) and "arguments" in values:
        # A fleetlm checkpoint's config.json: the run's arguments plus the architecture under "model".
        return ModelConfig.from_dict(values["model"], source)
    # architecture_dict() always writes norm_type, and no Hugging Face config has that key.
    if "norm_type" in values or values.get("model_type") not in HF_MODEL_TYPES:
        return ModelConfig.from_dict(values, source)
    return config_from_hf(values, source)


def load_model_config(args: ModelArguments) -> ModelConfig:
    """Resolve the architecture: a registered name or a directory with config.json, then overrides."""
    from fleetlm.models.registry import MODEL_REGISTRY, unknown_name_hint

    name = args.model_name_or_path
    if name in MODEL_REGISTRY:
        config = ModelConfig(**MODEL_REGISTRY[name])
    elif os.path.isdir(name):
        path = os.path.join(name, "config.json")
        if not os.path.isfile(path):
            raise ConfigError(f"model_name_or_path='{name}' is a directory without config.json.")
        try:
            with open(path, encoding="utf-8") as f:
                values = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e.msg} at line {e.lineno}.") from None
        config = config_from_json(values, path)
    else:
        raise ConfigError(
            f"model_name_or_path='{name}' is neither a registered model nor a directory with config.json. "
            f"{unknown_name_hint(name)}"
        )

    # Overriding the head count of a model without grouped-query attention keeps it without.
    follow_heads = config.num_key_value_heads == config.num_attention_heads and args.num_key_value_heads is None
    for key in MODEL_OVERRIDE_KEYS:
        value = getattr(args, key)
        if value is not None:
            setattr(config, key, value)
    if follow_heads:
        config.num_key_value_heads = config.num_attention_heads
    config.use_flash_attention = args.use_flash_attention
    config.use_fused_rms_norm = args.use_fused_rms_norm
    config.use_fused_rope = args.use_fused_rope
    config.use_fused_swiglu = args.use_fused_swiglu
    config.hidden_dropout_prob = args.hidden_dropout_prob
    config.attention_probs_dropout_prob = args.attention_probs_dropout_prob
    config.validate()
    return config
