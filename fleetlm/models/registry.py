"""Named architectures: naming one builds the model with no download.

Each entry holds the architecture fields of the published config.json of that checkpoint
(Hugging Face model cards of meta-llama and the LLaMA paper's Table 2 for the original LLaMA
sizes). Weights are never fetched: to start from released weights, point model_name_or_path at a
local directory that holds them together with config.json.
"""

from typing import Any, Dict, List

_LLAMA1 = dict(model_type="llama", vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10000.0)
_LLAMA2 = dict(model_type="llama", vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0)

_LLAMA2_7B = dict(_LLAMA2, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32)
_LLAMA2_13B = dict(_LLAMA2, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40)

MODEL_REGISTRY: Dict[str, Dict[str, Any]] = {
    # Test and demo sizes for CPU runs; the tokenizer decides vocab_size, so they set it small.
    "fleetlm/tiny-llama": dict(
        model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-6,
    ),
    "fleetlm/llama-15m": dict(
        model_type="llama", vocab_size=4096, hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
        num_attention_heads=6, max_position_embeddings=1024, rms_norm_eps=1e-6,
    ),
    "facebook/llama-7b": dict(
        _LLAMA1, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32
    ),
    "facebook/llama-13b": dict(
        _LLAMA1, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40
    ),
    "facebook/llama-65b": dict(
        _LLAMA1, hidden_size=8192, intermediate_size=22016, num_hidden_layers=80, num_attention_heads=64,
        rms_norm_eps=1e-5,
    ),
    "meta-llama/Llama-2-7b": _LLAMA2_7B,
    "meta-llama/Llama-2-7b-chat": _LLAMA2_7B,
    "meta-llama/Llama-2-13b": _LLAMA2_13B,
    "meta-llama/Llama-2-13b-chat": _LLAMA2_13B,
    "meta-llama/Llama-2-70b": dict(
        _LLAMA2, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
        num_key_value_heads=8,
    ),
}


def registered_names() -> List[str]:
    return sorted(MODEL_REGISTRY)
