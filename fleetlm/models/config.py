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
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: Optional[int] = 1
    eos_token_id: Optional[int] = 2
    # Run-time switches, not part of the architecture; set from ModelArguments/TrainingArguments.
    use_flash_attention: bool = field(default=False, metadata={"runtime": True})
    use_fused_rms_norm: bool = field(default=False, metadata={"runtime": True})
    use_fused_rope: bool = field(default=False, metadata={"runtime": True})
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
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} (hidden_size / num_attention_heads) must be even for rotary.")

    def architecture_dict(self) -> Dict[str, Any]:
        """Return the architecture fields (no run-time switches), as written to config.json."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.metadata.get("runtime")}

    @classmethod
    def from_dict(cls, values: Dict[str, Any], source: str) -> "ModelConfig":
        """Build from a config.json dict; keys fleetlm does not model are ignored (HF writes many)."""
        known = {f.name for f in dataclasses.fields(cls) if not f.metadata.get("runtime")}
        picked = {k: v for k, v in values.items() if k in known}
        if "model_type" in values and values["model_type"] not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{source}: model_type '{values['model_type']}' is not supported; "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}."
            )
        return cls(**picked)


SUPPORTED_MODEL_TYPES = ("llama",)


def load_model_config(args: ModelArguments) -> ModelConfig:
    """Resolve the architecture: a registered name or a directory with config.json, then overrides."""
    from fleetlm.models.registry import MODEL_REGISTRY, registered_names

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
        config = ModelConfig.from_dict(values, path)
    else:
        raise ConfigError(
            f"model_name_or_path='{name}' is neither a registered model nor a directory with config.json. "
            f"Registered names: {', '.join(registered_names())}."
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
    config.hidden_dropout_prob = args.hidden_dropout_prob
    config.attention_probs_dropout_prob = args.attention_probs_dropout_prob
    config.validate()
    return config
