"""Translate Hugging Face config.json files to fleetlm's ModelConfig and back.

Each family's config.json names the same quantities differently (``n_embd``, ``num_layers``,
``inner_hidden_size``, ``layernorm_epsilon`` ...). ``config_from_hf`` reads the keys of the families
that fleetlm builds. An option that would change the math in a way fleetlm does not implement is
rejected with its key and value, not ignored. ``config_to_hf`` writes the keys that
the family's Hugging Face code reads, for ``python -m fleetlm.export``.
"""

from typing import Any, Callable, Dict

from fleetlm.arguments import ConfigError
from fleetlm.models.config import ModelConfig

# model_type values of the config.json files that config_from_hf reads. "qwen" is Qwen v1's
# remote-code config; "qwen2" is transformers' Qwen2, whose math equals Qwen v1's.
HF_MODEL_TYPES = ("llama", "baichuan", "qwen", "qwen2", "chatglm", "gpt2", "bloom", "opt")

_LAYERNORM = dict(norm_type="layernorm", gated_mlp=False, mlp_bias=True, attention_bias=True, attention_out_bias=True)


def _require(values: Dict[str, Any], source: str, key: str, expected: Any, default: Any = None) -> None:
    value = values.get(key, default)
    if value != expected:
        raise ConfigError(f"{source}: {key}={value!r} is not supported by fleetlm; only {expected!r} is.")


def _rope_theta(values: Dict[str, Any]) -> float:
    # transformers 5 writes rope_parameters: {"rope_theta": ...}; older files write rope_theta.
    parameters = values.get("rope_parameters") or {}
    if parameters.get("rope_type", "default") != "default":
        raise ConfigError(f"rope_parameters rope_type={parameters['rope_type']!r} is not supported; only 'default' is.")
    return float(parameters.get("rope_theta", values.get("rope_theta", 10000.0)))


def _ids(values: Dict[str, Any]) -> Dict[str, Any]:
    return dict(bos_token_id=values.get("bos_token_id"), eos_token_id=values.get("eos_token_id"))


def _from_llama(values: Dict[str, Any], source: str) -> Dict[str, Any]:
    heads = values["num_attention_heads"]
    if values.get("head_dim") not in (None, values["hidden_size"] // heads):
        raise ConfigError(f"{source}: head_dim={values['head_dim']} differs from hidden_size / num_attention_heads.")
    if values.get("model_type") == "qwen2":
        _require(values, source, "use_sliding_window", False, False)
    bias = bool(values.get("attention_bias", False))
    return dict(
        model_type="qwen" if values.get("model_type") == "qwen2" else "llama",
        vocab_size=values["vocab_size"],
        hidden_size=values["hidden_size"],
        intermediate_size=values["intermediate_size"],
        num_hidden_layers=values["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=values.get("num_key_value_heads") or heads,
        max_position_embeddings=values.get("max_position_embeddings", 2048),
        rms_norm_eps=values.get("rms_norm_eps", 1e-6),
        rope_theta=_rope_theta(values),
        tie_word_embeddings=bool(values.get("tie_word_embeddings", False)),
        hidden_act=values.get("hidden_act", "silu"),
        # Qwen2 always has q/k/v bias and no output bias; LLaMA's attention_bias covers all four.
        attention_bias=True if values.get("model_type") == "qwen2" else bias,
        attention_out_bias=False if values.get("model_type") == "qwen2" else bias,
        mlp_bias=bool(values.get("mlp_bias", False)),
        **_ids(values),
    )


def _from_baichuan(values: Dict[str, Any], source: str) -> Dict[str, Any]:
    hidden = values["hidden_size"]
    max_positions = values.get("max_position_embeddings") or values.get("model_max_length", 4096)
    return dict(
        model_type="baichuan",
        vocab_size=values["vocab_size"],
        hidden_size=hidden,
        intermediate_size=values["intermediate_size"],
        num_hidden_layers=values["num_hidden_layers"],
        num_attention_heads=values["num_attention_heads"],
        max_position_embeddings=max_positions,
        rms_norm_eps=values.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(values.get("tie_word_embeddings", False)),
        # Baichuan's config.json does not name its position encoding or output layer: the 13B
        # models' code (hidden size 5120) uses ALiBi, the 7B models' rotary; Baichuan2 (vocabulary
        # 125,696) uses NormHead. A fleetlm-written file states both explicitly.
        position_embedding_type=values.get("position_embedding_type", "alibi" if hidden == 5120 else "rope"),
        norm_head=bool(values.get("norm_head", values["vocab_size"] == 125696)),
        **_ids(values),
    )


def _from_qwen(values: Dict[str, Any], source: str) -> Dict[str, Any]:
    _require(values, source, "rotary_pct", 1.0, 1.0)
    return dict(
        model_type="qwen",
        vocab_size=values["vocab_size"],
        hidden_size=values["hidden_size"],
        # Qwen's MLP projections are intermediate_size // 2 wide (QWenMLP's ff_dim_in).
        intermediate_size=values["intermediate_size"] // 2,
        num_hidden_layers=values["num_hidden_layers"],
        num_attention_heads=values["num_attention_heads"],
        max_position_embeddings=values.get("max_position_embeddings") or values.get("seq_length", 2048),
        rms_norm_eps=values.get("layer_norm_epsilon", 1e-6),
        rope_theta=float(values.get("rotary_emb_base", 10000.0)),
        tie_word_embeddings=bool(values.get("tie_word_embeddings", False)),
        attention_bias=True,
        attention_out_bias=not values.get("no_bias", True),
        bos_token_id=None,
        eos_token_id=values.get("eos_token_id", 151643),
    )


def _from_chatglm(values: Dict[str, Any], source: str) -> Dict[str, Any]:
    if "padded_vocab_size" in values:  # ChatGLM2 and ChatGLM3
        heads = values["num_attention_heads"]
        if values.get("kv_channels", values["hidden_size"] // heads) != values["hidden_size"] // heads:
            raise ConfigError(f"{source}: kv_channels={values['kv_channels']} differs from hidden_size / heads.")
        _require(values, source, "rmsnorm", True, True)
        _require(values, source, "add_bias_linear", False, False)
        _require(values, source, "apply_residual_connection_post_layernorm", False, False)
        kv_heads = values.get("multi_query_group_num", heads) if values.get("multi_query_attention") else heads
        return dict(
            model_type="chatglm2",
            vocab_size=values["padded_vocab_size"],
            hidden_size=values["hidden_size"],
            intermediate_size=values["ffn_hidden_size"],
            num_hidden_layers=values["num_layers"],
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            max_position_embeddings=values.get("seq_length", 32768),
            rms_norm_eps=values.get("layernorm_epsilon", 1e-5),
            rope_theta=10000.0 * float(values.get("rope_ratio", 1.0)),
            partial_rotary_factor=0.5,
            rope_interleaved=True,
            attention_bias=bool(values.get("add_qkv_bias", True)),
            tie_word_embeddings=False,
            bos_token_id=values.get("bos_token_id", 1),
            eos_token_id=values.get("eos_token_id", 2),
        )
    _require(values, source, "position_encoding_2d", True, True)
    return dict(
        _LAYERNORM,
        model_type="chatglm",
        vocab_size=values["vocab_size"],
        hidden_size=values["hidden_size"],
        intermediate_size=values.get("inner_hidden_size") or 4 * values["hidden_size"],
        num_hidden_layers=values["num_layers"],
        num_attention_heads=values["num_attention_heads"],
        max_position_embeddings=values.get("max_sequence_length", 2048),
        rms_norm_eps=values.get("layernorm_epsilon", 1e-5),
        hidden_act="gelu_new",
        position_encoding_2d=True,
        tie_word_embeddings=False,
        **_ids(values),
    )


def _from_gpt2(values: Dict[str, Any], source: str) -> Dict[str, Any]:
    for key in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        _require(values, source, key, False, False)
    _require(values, source, "scale_attn_weights", True, True)
    hidden = values["n_embd"]
    return dict(
        _LAYERNORM,
        model_type="gpt",
        vocab_size=values["vocab_size"],
        hidden_size=hidden,
        intermediate_size=values.get("n_inner") or 4 * hidden,
        num_hidden_layers=values["n_layer"],
        num_attention_heads=values["n_head"],
        max_position_embeddings=values.get("n_positions", 1024),
        rms_norm_eps=values.get("layer_norm_epsilon", 1e-5),
        hidden_act=values.get("activation_function", "gelu_new"),
        position_embedding_type="learned",
        tie_word_embeddings=bool(values.get("tie_word_embeddings", True)),
        **_ids(values),
    )


def _from_bloom(values: Dict[str, Any], source: str) -> Dict[str, Any]:
    _require(values, source, "apply_residual_connection_post_layernorm", False, False)
    hidden = values.get("hidden_size") or values["n_embed"]
    return dict(
        _LAYERNORM,
        model_type="bloom",
        vocab_size=values["vocab_size"],
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=values.get("n_layer") or values["num_hidden_layers"],
        num_attention_heads=values.get("n_head") or values["num_attention_heads"],
        # BLOOM has no position table, so its training length is used as the limit.
        max_position_embeddings=values.get("seq_length", 2048),
        rms_norm_eps=values.get("layer_norm_epsilon", 1e-5),
        hidden_act="gelu_new",
        position_embedding_type="alibi",
        embedding_layernorm=True,
        tie_word_embeddings=bool(values.get("tie_word_embeddings", True)),
        **_ids(values),
    )


def _from_opt(values: Dict[str, Any], source: str) -> Dict[str, Any]:
    _require(values, source, "enable_bias", True, True)
    _require(values, source, "layer_norm_elementwise_affine", True, True)
    _require(values, source, "_remove_final_layer_norm", False, False)
    hidden = values["hidden_size"]
    projection = values.get("word_embed_proj_dim", hidden)
    return dict(
        _LAYERNORM,
        model_type="opt",
        vocab_size=values["vocab_size"],
        hidden_size=hidden,
        intermediate_size=values["ffn_dim"],
        num_hidden_layers=values["num_hidden_layers"],
        num_attention_heads=values["num_attention_heads"],
        max_position_embeddings=values.get("max_position_embeddings", 2048),
        rms_norm_eps=1e-5,  # OPT's LayerNorms use PyTorch's default epsilon
        hidden_act=values.get("activation_function", "relu"),
        position_embedding_type="learned",
        position_offset=2,
        pre_norm=bool(values.get("do_layer_norm_before", True)),
        word_embed_proj_dim=None if projection == hidden else projection,
        tie_word_embeddings=bool(values.get("tie_word_embeddings", True)),
        **_ids(values),
    )


_READERS: Dict[str, Callable[[Dict[str, Any], str], Dict[str, Any]]] = {
    "llama": _from_llama,
    "qwen2": _from_llama,
    "baichuan": _from_baichuan,
    "qwen": _from_qwen,
    "chatglm": _from_chatglm,
    "gpt2": _from_gpt2,
    "bloom": _from_bloom,
    "opt": _from_opt,
}


def config_from_hf(values: Dict[str, Any], source: str) -> ModelConfig:
    """Build a ModelConfig from a Hugging Face config.json dict; ``source`` names the file in errors."""
    model_type = values.get("model_type")
    if model_type not in _READERS:
        raise ConfigError(f"{source}: model_type {model_type!r} is not one of {', '.join(HF_MODEL_TYPES)}.")
    try:
        fields = _READERS[model_type](values, source)
    except KeyError as e:
        raise ConfigError(f"{source}: a {model_type} config.json needs the key {e.args[0]!r}.") from None
    return ModelConfig(**fields)


def hf_model_type(values: Dict[str, Any]) -> str:
    """Return the weight-name layout of a Hugging Face config.json: its model_type, with ChatGLM split in two."""
    model_type = values.get("model_type")
    if model_type == "chatglm" and "padded_vocab_size" in values:
        return "chatglm2"
    return model_type


def config_to_hf(config: ModelConfig) -> Dict[str, Any]:
    """Return the config.json that the family's Hugging Face code reads for this architecture.

    Qwen is written as transformers' qwen2 (same math, loadable without remote code). GLM-130B
    has no Hugging Face layout and raises ConfigError.
    """
    c = config
    common = dict(bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, torch_dtype="float32")
    if c.model_type in ("llama", "qwen", "baichuan"):
        out = dict(
            common,
            vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
            num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
            num_key_value_heads=c.num_key_value_heads, max_position_embeddings=c.max_position_embeddings,
            rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta, tie_word_embeddings=c.tie_word_embeddings,
            hidden_act=c.hidden_act, initializer_range=c.initializer_range,
        )
        if c.model_type == "llama":
            return dict(out, model_type="llama", architectures=["LlamaForCausalLM"], attention_bias=c.attention_bias,
                        mlp_bias=c.mlp_bias)
        if c.model_type == "qwen":
            return dict(out, model_type="qwen2", architectures=["Qwen2ForCausalLM"], use_sliding_window=False)
        return dict(out, model_type="baichuan", architectures=["BaichuanForCausalLM"], model_max_length=c.max_position_embeddings,
                    position_embedding_type=c.position_embedding_type, norm_head=c.norm_head)
    if c.model_type == "chatglm2":
        return dict(
            common, model_type="chatglm", architectures=["ChatGLMModel"], padded_vocab_size=c.vocab_size,
            hidden_size=c.hidden_size, ffn_hidden_size=c.intermediate_size, num_layers=c.num_hidden_layers,
            num_attention_heads=c.num_attention_heads, kv_channels=c.head_dim,
            multi_query_attention=c.num_key_value_heads != c.num_attention_heads,
            multi_query_group_num=c.num_key_value_heads, seq_length=c.max_position_embeddings,
            layernorm_epsilon=c.rms_norm_eps, rmsnorm=True, add_qkv_bias=c.attention_bias, add_bias_linear=False,
            apply_residual_connection_post_layernorm=False, post_layer_norm=True, rope_ratio=c.rope_theta / 10000.0,
        )
    if c.model_type == "chatglm":
        return dict(
            common, model_type="chatglm", architectures=["ChatGLMModel"], vocab_size=c.vocab_size,
            hidden_size=c.hidden_size, inner_hidden_size=c.intermediate_size, num_layers=c.num_hidden_layers,
            num_attention_heads=c.num_attention_heads, max_sequence_length=c.max_position_embeddings,
            layernorm_epsilon=c.rms_norm_eps, position_encoding_2d=True,
        )
    if c.model_type == "gpt":
        return dict(
            common, model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=c.vocab_size, n_embd=c.hidden_size,
            n_inner=c.intermediate_size, n_layer=c.num_hidden_layers, n_head=c.num_attention_heads,
            n_positions=c.max_position_embeddings, layer_norm_epsilon=c.rms_norm_eps, activation_function=c.hidden_act,
            tie_word_embeddings=c.tie_word_embeddings,
        )
    if c.model_type == "bloom":
        return dict(
            common, model_type="bloom", architectures=["BloomForCausalLM"], vocab_size=c.vocab_size,
            hidden_size=c.hidden_size, n_layer=c.num_hidden_layers, n_head=c.num_attention_heads,
            layer_norm_epsilon=c.rms_norm_eps, seq_length=c.max_position_embeddings,
            tie_word_embeddings=c.tie_word_embeddings,
        )
    if c.model_type == "opt":
        return dict(
            common, model_type="opt", architectures=["OPTForCausalLM"], vocab_size=c.vocab_size,
            hidden_size=c.hidden_size, ffn_dim=c.intermediate_size, num_hidden_layers=c.num_hidden_layers,
            num_attention_heads=c.num_attention_heads, max_position_embeddings=c.max_position_embeddings,
            do_layer_norm_before=c.pre_norm, word_embed_proj_dim=c.word_embed_proj_dim or c.hidden_size,
            activation_function=c.hidden_act, tie_word_embeddings=c.tie_word_embeddings,
        )
    raise ConfigError(f"model_type '{c.model_type}' has no Hugging Face layout to export to.")
