"""Named architectures: naming one builds the model with no download.

Each entry contains the architecture fields of the published config.json of that checkpoint on the
Hugging Face Hub, or of the paper table named in its comment. Weights are never fetched: to start
from released weights, point model_name_or_path at a local directory that holds them together with
config.json (fleetlm.models.weights reads Hugging Face, PyTorch and Paddle layouts).

Field names are fleetlm's (fleetlm.models.config.ModelConfig); where a family's config.json uses
other names, fleetlm.models.hf_configs translates them. Two translations change a number: Qwen's
config.json gives intermediate_size as twice the width of each MLP projection (22016 for 11008),
and BLOOM has no position limit, so max_position_embeddings is its training length, 2048.
"""

import difflib
from typing import Any, Dict, List

# ---- LLaMA-like families (fleetlm/models/llama.py) ----

# LLaMA paper (Touvron et al., 2023a), Table 2; config.json of the converted checkpoints.
_LLAMA1 = dict(model_type="llama", vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10000.0)
# config.json of meta-llama/Llama-2-{7b,13b,70b}-hf.
_LLAMA2 = dict(model_type="llama", vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0)
_LLAMA_13B_SHAPE = dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40)

_LLAMA2_7B = dict(_LLAMA2, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32)
_LLAMA2_13B = dict(_LLAMA2, **_LLAMA_13B_SHAPE)

# config.json of baichuan-inc/Baichuan-7B, Baichuan-13B-Base and Baichuan2-{7B,13B}-Base
# (model_max_length 4096 on the 13B models, which have no max_position_embeddings key).
_BAICHUAN = dict(model_type="baichuan", vocab_size=64000, max_position_embeddings=4096, rms_norm_eps=1e-6)
_BAICHUAN_7B = dict(_BAICHUAN, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32)
_BAICHUAN_13B = dict(
    _BAICHUAN, hidden_size=5120, intermediate_size=13696, num_hidden_layers=40, num_attention_heads=40,
    position_embedding_type="alibi",
)
_BAICHUAN2 = dict(vocab_size=125696, norm_head=True)

# config.json of Qwen/Qwen-7B (the 8,192-token update) and Qwen/Qwen-14B. The tokenizer has
# 151,851 ids; vocab_size is padded. intermediate_size is config.json's value halved (see above).
# Qwen's use_dynamic_ntk and use_logn_attn change attention only beyond seq_length at inference,
# so training within max_position_embeddings needs neither.
_QWEN = dict(model_type="qwen", rms_norm_eps=1e-6, rope_theta=10000.0, attention_bias=True, bos_token_id=None,
             eos_token_id=151643)
_QWEN_7B = dict(
    _QWEN, vocab_size=151936, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
    max_position_embeddings=8192,
)
_QWEN_14B = dict(
    _QWEN, vocab_size=152064, hidden_size=5120, intermediate_size=13696, num_hidden_layers=40, num_attention_heads=40,
    max_position_embeddings=2048,
)

# config.json of THUDM/chatglm2-6b: multi_query_group_num 2, kv_channels 128, rotary on half of
# each head in interleaved pairs, add_qkv_bias true, add_bias_linear false, padded_vocab_size 65024.
_CHATGLM2_6B = dict(
    model_type="chatglm2", vocab_size=65024, hidden_size=4096, intermediate_size=13696, num_hidden_layers=28,
    num_attention_heads=32, num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-5,
    rope_theta=10000.0, partial_rotary_factor=0.5, rope_interleaved=True, attention_bias=True,
    bos_token_id=1, eos_token_id=2,
)

# ---- GPT-2 block families (fleetlm/models/gpt.py) ----

# GPT-3 paper (Brown et al., 2020), Table 2.1: n_layers, d_model, n_heads; d_ff = 4 * d_model,
# n_ctx 2048, GPT-2's BPE vocabulary of 50,257 tokens, GPT-2's block.
# NOTE: GPT-3 alternates dense and locally banded sparse attention layers; fleetlm builds every
# layer dense, as GPT-2 does.
_GPT3 = dict(
    model_type="gpt", vocab_size=50257, max_position_embeddings=2048, rms_norm_eps=1e-5, norm_type="layernorm",
    hidden_act="gelu_new", gated_mlp=False, mlp_bias=True, attention_bias=True, attention_out_bias=True,
    position_embedding_type="learned", tie_word_embeddings=True, bos_token_id=50256, eos_token_id=50256,
)


def _gpt3(num_layers: int, hidden_size: int, num_heads: int) -> Dict[str, Any]:
    return dict(_GPT3, num_hidden_layers=num_layers, hidden_size=hidden_size, num_attention_heads=num_heads,
                intermediate_size=4 * hidden_size)


# config.json of facebook/opt-{125m,350m,66b}: ReLU, learned positions with offset 2, tied output.
_OPT = dict(
    model_type="opt", vocab_size=50272, max_position_embeddings=2048, rms_norm_eps=1e-5, norm_type="layernorm",
    hidden_act="relu", gated_mlp=False, mlp_bias=True, attention_bias=True, attention_out_bias=True,
    position_embedding_type="learned", position_offset=2, tie_word_embeddings=True, bos_token_id=2, eos_token_id=2,
)

# config.json of bigscience/bloom-7b1 and bigscience/bloom (n_layer, n_head, hidden_size; 4x MLP).
_BLOOM = dict(
    model_type="bloom", vocab_size=250880, max_position_embeddings=2048, rms_norm_eps=1e-5, norm_type="layernorm",
    hidden_act="gelu_new", gated_mlp=False, mlp_bias=True, attention_bias=True, attention_out_bias=True,
    position_embedding_type="alibi", embedding_layernorm=True, tie_word_embeddings=True, bos_token_id=1,
    eos_token_id=2,
)
_BLOOM_7B1 = dict(_BLOOM, hidden_size=4096, intermediate_size=16384, num_hidden_layers=30, num_attention_heads=32)

# ---- GLM block families (fleetlm/models/chatglm.py) ----

# config.json of THUDM/chatglm-6b (v1.1 checkpoint: 130,528 ids; inner_hidden_size 16384).
_CHATGLM_6B = dict(
    model_type="chatglm", vocab_size=130528, hidden_size=4096, intermediate_size=16384, num_hidden_layers=28,
    num_attention_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-5, norm_type="layernorm",
    hidden_act="gelu_new", gated_mlp=False, mlp_bias=True, attention_bias=True, attention_out_bias=True,
    position_encoding_2d=True, bos_token_id=130004, eos_token_id=130005,
)

# THUDM/GLM-130B configs/model_glm_130b.sh: 70 layers, hidden 12288, inner 32768 (GeGLU), 96 heads,
# vocabulary 150,528, 2048 tokens, post-LayerNorm order (DeepNorm); 1D rotary, output tied to the embedding.
_GLM_130B = dict(
    model_type="glm", vocab_size=150528, hidden_size=12288, intermediate_size=32768, num_hidden_layers=70,
    num_attention_heads=96, max_position_embeddings=2048, rms_norm_eps=1e-5, norm_type="layernorm",
    hidden_act="gelu", gated_mlp=True, mlp_bias=True, attention_bias=True, attention_out_bias=True,
    tie_word_embeddings=True, bos_token_id=None, eos_token_id=None,
)

# Test and debug sizes for CPU runs: vocabulary 512 (the synthetic token files'), two blocks.
_TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=1024)

MODEL_REGISTRY: Dict[str, Dict[str, Any]] = {
    "fleetlm/tiny-llama": dict(_TINY, model_type="llama", num_key_value_heads=2, rms_norm_eps=1e-6),
    "fleetlm/llama-15m": dict(
        model_type="llama", vocab_size=4096, hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
        num_attention_heads=6, max_position_embeddings=1024, rms_norm_eps=1e-6,
    ),
    "fleetlm/tiny-baichuan2": dict(_BAICHUAN_13B, **_TINY, norm_head=True),
    "fleetlm/tiny-qwen": dict(_QWEN, **_TINY, eos_token_id=2),
    "fleetlm/tiny-chatglm2": dict(_CHATGLM2_6B, **dict(_TINY, num_key_value_heads=2)),
    "fleetlm/tiny-gpt": dict(_GPT3, **dict(_TINY, intermediate_size=256), eos_token_id=2, bos_token_id=1),
    "fleetlm/tiny-opt": dict(_OPT, **dict(_TINY, intermediate_size=256), pre_norm=False, word_embed_proj_dim=32),
    "fleetlm/tiny-bloom": dict(_BLOOM, **dict(_TINY, intermediate_size=256)),
    "fleetlm/tiny-chatglm": dict(_CHATGLM_6B, **dict(_TINY, intermediate_size=256), bos_token_id=1, eos_token_id=2),
    "fleetlm/tiny-glm": dict(_GLM_130B, **_TINY),
    # LLaMA
    "facebook/llama-7b": dict(
        _LLAMA1, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32
    ),
    "facebook/llama-13b": dict(_LLAMA1, **_LLAMA_13B_SHAPE),
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
    # Chinese LLaMA derivatives: the LLaMA architecture with their own vocabularies.
    # FlagAlpha/Llama2-Chinese-{7b,13b}-Chat: Llama-2-chat fine-tunes with the original 32,000-token vocabulary.
    "FlagAlpha/Llama2-Chinese-7b-Chat": _LLAMA2_7B,
    "FlagAlpha/Llama2-Chinese-13b-Chat": _LLAMA2_13B,
    # IDEA-CCNL/Ziya-LLaMA-13B-v1 config.json: LLaMA-13B with a 39,424-token vocabulary.
    "idea-ccnl/ziya-llama-13b-v1": dict(_LLAMA1, **_LLAMA_13B_SHAPE, vocab_size=39424),
    # Linly-AI/Chinese-LLaMA-2-{7B,13B}-hf: LLaMA-2 with a 40,076-token vocabulary.
    # NOTE: vocabulary size from the model card, not checked against the config.json file.
    "linly-ai/chinese-llama-2-7b": dict(_LLAMA2_7B, vocab_size=40076),
    "linly-ai/chinese-llama-2-13b": dict(_LLAMA2_13B, vocab_size=40076),
    # Baichuan and Baichuan2
    "baichuan-inc/Baichuan-7B": _BAICHUAN_7B,
    "baichuan-inc/Baichuan-13B-Base": _BAICHUAN_13B,
    "baichuan-inc/Baichuan-13B-Chat": _BAICHUAN_13B,
    "baichuan-inc/Baichuan2-7B-Base": dict(_BAICHUAN_7B, **_BAICHUAN2),
    "baichuan-inc/Baichuan2-7B-Chat": dict(_BAICHUAN_7B, **_BAICHUAN2),
    "baichuan-inc/Baichuan2-13B-Base": dict(_BAICHUAN_13B, **_BAICHUAN2),
    "baichuan-inc/Baichuan2-13B-Chat": dict(_BAICHUAN_13B, **_BAICHUAN2),
    # Qwen v1
    "qwen/qwen-7b": _QWEN_7B,
    "qwen/qwen-7b-chat": _QWEN_7B,
    "qwen/qwen-14b": _QWEN_14B,
    "qwen/qwen-14b-chat": _QWEN_14B,
    # ChatGLM, ChatGLM2, GLM-130B
    "THUDM/chatglm-6b-v1.1": _CHATGLM_6B,
    "THUDM/chatglm2-6b": _CHATGLM2_6B,
    "THUDM/glm-130b": _GLM_130B,
    # BLOOM (bloomz-7b1 and bloomz-7b1-mt are fine-tunes of bloom-7b1 with its architecture)
    "bigscience/bloom-7b1": _BLOOM_7B1,
    "bigscience/bloomz-7b1": _BLOOM_7B1,
    "bigscience/bloomz-7b1-mt": _BLOOM_7B1,
    "bigscience/bloom": dict(
        _BLOOM, hidden_size=14336, intermediate_size=57344, num_hidden_layers=70, num_attention_heads=112
    ),
    # OPT
    "facebook/opt-125m": dict(_OPT, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
    "facebook/opt-350m": dict(
        _OPT, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        word_embed_proj_dim=512, pre_norm=False,
    ),
    "facebook/opt-66b": dict(
        _OPT, hidden_size=9216, intermediate_size=36864, num_hidden_layers=64, num_attention_heads=72
    ),
    # GPT-3 (Brown et al., 2020, Table 2.1)
    "gpt3-125m": _gpt3(12, 768, 12),
    "gpt3-350m": _gpt3(24, 1024, 16),
    "gpt3-760m": _gpt3(24, 1536, 16),
    # The table gives 1.3B 24 heads of d_head 128, which do not make d_model 2048; 16 heads of 128 do.
    "gpt3-1.3b": _gpt3(24, 2048, 16),
    "gpt3-2.7b": _gpt3(32, 2560, 32),
    "gpt3-6.7b": _gpt3(32, 4096, 32),
    # The table gives d_model 5140 for 13B, which 40 heads of 128 cannot produce; 5120 = 40 x 128.
    "gpt3-13b": _gpt3(40, 5120, 40),
    "gpt3-175b": _gpt3(96, 12288, 96),
}


def registered_names() -> List[str]:
    return sorted(MODEL_REGISTRY)


def _comparable(name: str) -> str:
    # Hub names of converted LLaMA checkpoints end in "-hf" (meta-llama/Llama-2-7b-hf); registered names do not.
    return name.lower().removesuffix("-hf")


def _name_similarity(name: str, registered: str) -> float:
    """Similarity in [0, 1] of two comparable names, by whole name or by the part after the organisation."""
    whole = difflib.SequenceMatcher(None, name, registered).ratio()
    model = difflib.SequenceMatcher(None, name.rsplit("/", 1)[-1], registered.rsplit("/", 1)[-1]).ratio()
    return max(whole, model)


def closest_names(name: str, count: int = 5) -> List[str]:
    """Return the ``count`` registered names most like ``name`` (by difflib ratio, ignoring case), most similar first."""
    requested = _comparable(name)
    return sorted(MODEL_REGISTRY, key=lambda n: (-_name_similarity(requested, _comparable(n)), n))[:count]


def unknown_name_hint(name: str) -> str:
    """Return the sentences that follow an unknown model name in an error: the intended name, if clear, and the closest.

    "Did you mean" appears only for a name that differs in case or by a "-hf" suffix, because
    close spellings such as qwen/qwen-72b and qwen/qwen-7b are different models.
    """
    same = [n for n in MODEL_REGISTRY if _comparable(n) == _comparable(name)]
    closest = closest_names(name)
    sentences = [f"Did you mean '{same[0]}'?"] if same else []
    sentences.append(
        f"Closest registered names: {', '.join(closest)} "
        f"({len(MODEL_REGISTRY)} in all; fleetlm.models.registry.registered_names() lists them)."
    )
    return " ".join(sentences)


# Tokenizer files used when a registered name is passed as tokenizer_name_or_path. They are in the
# source tree's tests/assets/tokenizers, so an installed package has none. Qwen gets its own ranks,
# and GPT-3 and OPT get GPT-2's BPE, which both use. LLaMA, the Chinese LLaMAs and Baichuan get
# Mistral's 32,000-piece SentencePiece BPE as a stand-in of the same kind. ChatGLM and ChatGLM2 get
# ChatGLM3's tokenizer.json, the closest one available. BLOOM and GLM-130B have no stand-in.
# Tokenize real training data with the checkpoint's own tokenizer file.
_TOKENIZER_ASSETS = {
    "llama": "mistral-spm/tokenizer.model",
    "baichuan": "mistral-spm/tokenizer.model",
    "qwen": "qwen/qwen.tiktoken",
    "gpt": "gpt2/gpt2.tiktoken",
    "opt": "gpt2/gpt2.tiktoken",
    "chatglm": "chatglm3/tokenizer.json",
    "chatglm2": "chatglm3/tokenizer.json",
}


def bundled_tokenizer_files() -> Dict[str, str]:
    """Map each registered name (except the fleetlm/ test sizes) to its bundled stand-in tokenizer file."""
    import os

    root = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                        "tests", "assets", "tokenizers")
    return {
        name: os.path.join(root, _TOKENIZER_ASSETS[entry["model_type"]])
        for name, entry in MODEL_REGISTRY.items()
        if entry["model_type"] in _TOKENIZER_ASSETS and not name.startswith("fleetlm/")
    }
