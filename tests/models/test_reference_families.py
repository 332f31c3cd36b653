"""Families without a transformers implementation against NumPy references written from their equations.

Baichuan, Qwen v1, ChatGLM2 and ChatGLM-6B: random tensors in the family's own checkpoint layout
(W_pack, c_attn, query_key_value ...) are saved with a config.json in that family's format. fleetlm
loads them through its config translation and weight import, and the test compares the logits with
a float64 NumPy forward pass that reads the checkpoint tensors directly. GLM-130B has no Hugging Face
layout, so its reference reads the fleetlm state dict.
"""

import json
import math

import numpy as np
import paddle
import pytest
from safetensors.numpy import save_file

from fleetlm.arguments import ModelArguments
from fleetlm.models import ModelConfig, build_model, load_model_config
from fleetlm.models.weights import load_pretrained

VOCAB, HIDDEN, HEADS, LAYERS = 96, 48, 4, 2
HEAD_DIM = HIDDEN // HEADS


# ---- reference pieces, float64 ----

def rms_norm(x, weight, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * weight


def layer_norm(x, weight, bias, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def silu(x):
    return x / (1.0 + np.exp(-x))


def gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def gelu_erf(x):
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def rotate(x, positions, base, rotary_dim, interleaved=False):
    """RoPE on the first rotary_dim dims of x [s, h, d]; pairs (i, i + r/2), or (2i, 2i+1) when interleaved."""
    out = x.copy()
    half = rotary_dim // 2
    for i in range(half):
        angle = positions[:, None] * base ** (-2.0 * i / rotary_dim)  # [s, 1]
        a, b = (2 * i, 2 * i + 1) if interleaved else (i, i + half)
        xa, xb = x[..., a], x[..., b]
        out[..., a] = xa * np.cos(angle) - xb * np.sin(angle)
        out[..., b] = xb * np.cos(angle) + xa * np.sin(angle)
    return out


def alibi_slopes(num_heads):
    # Press et al. (2022): 2^(-8i/n) for n a power of two. Other head counts take the series of the
    # nearest lower power of two, completed by the odd-indexed slopes of the next power of two.
    def powers(n):
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]

    n = 2 ** int(math.log2(num_heads))
    return np.array(powers(n) + powers(2 * n)[0::2][: num_heads - n])


def attention(q, k, v, slopes=None, prefix_length=0):
    """q [s, h, d], k/v [s, kv, d] -> [s, h * d], causal plus a bidirectional prefix."""
    s, h, d = q.shape
    k = np.repeat(k, h // k.shape[1], axis=1)
    v = np.repeat(v, h // v.shape[1], axis=1)
    scores = np.einsum("qhd,khd->hqk", q, k) / math.sqrt(d)
    i, j = np.arange(s)[:, None], np.arange(s)[None, :]
    if slopes is not None:
        scores = scores - slopes[:, None, None] * (i - j)
    allowed = (j <= i) | (j < prefix_length)
    scores = np.where(allowed, scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("hqk,khd->qhd", probs, v).reshape(s, h * d)


# ---- checkpoint helpers ----

def random_tensors(shapes, seed):
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in shapes.items():
        if "norm" in name or name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            value = 1.0 + 0.1 * rng.standard_normal(shape) if name.endswith("weight") else 0.1 * rng.standard_normal(shape)
        else:
            value = 0.1 * rng.standard_normal(shape)
        out[name] = value.astype(np.float32)
    return out


def save_checkpoint(directory, config_json, tensors):
    (directory / "config.json").write_text(json.dumps(config_json))
    save_file(tensors, str(directory / "model.safetensors"))


def fleet_logits(directory, tokens, **forward_kwargs):
    config = load_model_config(ModelArguments(model_name_or_path=str(directory)))
    model = build_model(config)
    load_pretrained(model, config, str(directory))
    model.eval()
    return model(paddle.to_tensor(tokens[None]), **forward_kwargs).numpy()[0], model


def w64(tensors):
    return {k: v.astype(np.float64) for k, v in tensors.items()}


TOKENS = np.random.default_rng(7).integers(0, VOCAB, size=19)


# ---- Baichuan: W_pack, rotary or ALiBi, NormHead ----

BAICHUAN_FFN = 80


def baichuan_shapes():
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,), "lm_head.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.W_pack.weight": (3 * HIDDEN, HIDDEN), p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            p + "mlp.gate_proj.weight": (BAICHUAN_FFN, HIDDEN), p + "mlp.up_proj.weight": (BAICHUAN_FFN, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, BAICHUAN_FFN), p + "input_layernorm.weight": (HIDDEN,),
            p + "post_attention_layernorm.weight": (HIDDEN,),
        })
    return shapes


def baichuan_reference(w, tokens, alibi, norm_head, eps=1e-6):
    x = w["model.embed_tokens.weight"][tokens]
    s = len(tokens)
    positions = np.arange(s, dtype=np.float64)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        h = rms_norm(x, w[p + "input_layernorm.weight"], eps)
        q, k, v = np.split(h @ w[p + "self_attn.W_pack.weight"].T, 3, axis=-1)
        q, k, v = (t.reshape(s, HEADS, HEAD_DIM) for t in (q, k, v))
        if not alibi:
            q, k = rotate(q, positions, 10000.0, HEAD_DIM), rotate(k, positions, 10000.0, HEAD_DIM)
        x = x + attention(q, k, v, alibi_slopes(HEADS) if alibi else None) @ w[p + "self_attn.o_proj.weight"].T
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        gated = silu(h @ w[p + "mlp.gate_proj.weight"].T) * (h @ w[p + "mlp.up_proj.weight"].T)
        x = x + gated @ w[p + "mlp.down_proj.weight"].T
    x = rms_norm(x, w["model.norm.weight"], eps)
    head = w["lm_head.weight"]
    if norm_head:
        head = head / np.linalg.norm(head, axis=-1, keepdims=True)
    return x @ head.T


@pytest.mark.parametrize(
    "variant, alibi, norm_head",
    [("Baichuan-7B", False, False), ("Baichuan-13B", True, False), ("Baichuan2-7B", False, True),
     ("Baichuan2-13B", True, True)],
)
def test_baichuan_matches_reference(variant, alibi, norm_head, tmp_path):
    tensors = random_tensors(baichuan_shapes(), seed=1)
    config_json = dict(
        model_type="baichuan", vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=BAICHUAN_FFN,
        num_hidden_layers=LAYERS, num_attention_heads=HEADS, model_max_length=64, rms_norm_eps=1e-6,
        position_embedding_type="alibi" if alibi else "rope", norm_head=norm_head,
    )
    save_checkpoint(tmp_path, config_json, tensors)
    logits, model = fleet_logits(tmp_path, TOKENS)
    assert model.config.model_type == "baichuan"
    expected = baichuan_reference(w64(tensors), TOKENS, alibi, norm_head)
    difference = np.abs(logits - expected).max()
    print(f"{variant}: max |logits difference| {difference:.2e}")
    assert difference < 1e-4


def test_baichuan_config_infers_alibi_and_norm_head():
    from fleetlm.models.hf_configs import config_from_hf

    base = dict(model_type="baichuan", intermediate_size=13696, num_hidden_layers=40, num_attention_heads=40,
                model_max_length=4096)
    baichuan2_13b = config_from_hf(dict(base, hidden_size=5120, vocab_size=125696), "test")
    assert baichuan2_13b.position_embedding_type == "alibi"
    assert baichuan2_13b.norm_head
    baichuan_7b = config_from_hf(dict(base, hidden_size=4096, vocab_size=64000, num_attention_heads=32), "test")
    assert baichuan_7b.position_embedding_type == "rope"
    assert not baichuan_7b.norm_head


# ---- Qwen v1: c_attn with bias, w1/w2/c_proj MLP ----

QWEN_FFN = 64  # config.json's intermediate_size is twice this


def test_qwen_v1_matches_reference(tmp_path):
    shapes = {"transformer.wte.weight": (VOCAB, HIDDEN), "transformer.ln_f.weight": (HIDDEN,),
              "lm_head.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"transformer.h.{i}."
        shapes.update({
            p + "ln_1.weight": (HIDDEN,), p + "ln_2.weight": (HIDDEN,),
            p + "attn.c_attn.weight": (3 * HIDDEN, HIDDEN), p + "attn.c_attn.bias": (3 * HIDDEN,),
            p + "attn.c_proj.weight": (HIDDEN, HIDDEN), p + "mlp.w1.weight": (QWEN_FFN, HIDDEN),
            p + "mlp.w2.weight": (QWEN_FFN, HIDDEN), p + "mlp.c_proj.weight": (HIDDEN, QWEN_FFN),
        })
    tensors = random_tensors(shapes, seed=2)
    config_json = dict(
        model_type="qwen", vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * QWEN_FFN,
        num_hidden_layers=LAYERS, num_attention_heads=HEADS, layer_norm_epsilon=1e-6, rotary_emb_base=10000,
        rotary_pct=1.0, seq_length=64, no_bias=True,
    )
    save_checkpoint(tmp_path, config_json, tensors)
    logits, _ = fleet_logits(tmp_path, TOKENS)

    w, s, eps = w64(tensors), len(TOKENS), 1e-6
    positions = np.arange(s, dtype=np.float64)
    x = w["transformer.wte.weight"][TOKENS]
    for i in range(LAYERS):
        p = f"transformer.h.{i}."
        h = rms_norm(x, w[p + "ln_1.weight"], eps)
        q, k, v = np.split(h @ w[p + "attn.c_attn.weight"].T + w[p + "attn.c_attn.bias"], 3, axis=-1)
        q, k, v = (t.reshape(s, HEADS, HEAD_DIM) for t in (q, k, v))
        q, k = rotate(q, positions, 10000.0, HEAD_DIM), rotate(k, positions, 10000.0, HEAD_DIM)
        x = x + attention(q, k, v) @ w[p + "attn.c_proj.weight"].T
        h = rms_norm(x, w[p + "ln_2.weight"], eps)
        # Qwen's MLP: c_proj(w1(h) * silu(w2(h))).
        x = x + ((h @ w[p + "mlp.w1.weight"].T) * silu(h @ w[p + "mlp.w2.weight"].T)) @ w[p + "mlp.c_proj.weight"].T
    expected = rms_norm(x, w["transformer.ln_f.weight"], eps) @ w["lm_head.weight"].T
    difference = np.abs(logits - expected).max()
    print(f"Qwen v1: max |logits difference| {difference:.2e}")
    assert difference < 1e-4


# ---- ChatGLM2: multi-query groups, interleaved rotary on half the head, fused gate/up ----

GLM2_FFN, GLM2_GROUPS = 72, 2


def test_chatglm2_matches_reference(tmp_path):
    qkv_rows = HIDDEN + 2 * GLM2_GROUPS * HEAD_DIM
    shapes = {"transformer.embedding.word_embeddings.weight": (VOCAB, HIDDEN),
              "transformer.encoder.final_layernorm.weight": (HIDDEN,),
              "transformer.output_layer.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"transformer.encoder.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (HIDDEN,), p + "post_attention_layernorm.weight": (HIDDEN,),
            p + "self_attention.query_key_value.weight": (qkv_rows, HIDDEN),
            p + "self_attention.query_key_value.bias": (qkv_rows,),
            p + "self_attention.dense.weight": (HIDDEN, HIDDEN),
            p + "mlp.dense_h_to_4h.weight": (2 * GLM2_FFN, HIDDEN), p + "mlp.dense_4h_to_h.weight": (HIDDEN, GLM2_FFN),
        })
    tensors = random_tensors(shapes, seed=3)
    config_json = dict(
        model_type="chatglm", padded_vocab_size=VOCAB, hidden_size=HIDDEN, ffn_hidden_size=GLM2_FFN,
        num_layers=LAYERS, num_attention_heads=HEADS, kv_channels=HEAD_DIM, multi_query_attention=True,
        multi_query_group_num=GLM2_GROUPS, seq_length=64, layernorm_epsilon=1e-5, rmsnorm=True, add_qkv_bias=True,
        add_bias_linear=False,
    )
    save_checkpoint(tmp_path, config_json, tensors)
    logits, model = fleet_logits(tmp_path, TOKENS)
    assert model.config.model_type == "chatglm2"
    assert model.config.num_key_value_heads == GLM2_GROUPS

    w, s, eps = w64(tensors), len(TOKENS), 1e-5
    positions = np.arange(s, dtype=np.float64)
    x = w["transformer.embedding.word_embeddings.weight"][TOKENS]
    for i in range(LAYERS):
        p = f"transformer.encoder.layers.{i}."
        h = rms_norm(x, w[p + "input_layernorm.weight"], eps)
        qkv = h @ w[p + "self_attention.query_key_value.weight"].T + w[p + "self_attention.query_key_value.bias"]
        q, k, v = np.split(qkv, [HIDDEN, HIDDEN + GLM2_GROUPS * HEAD_DIM], axis=-1)
        q = rotate(q.reshape(s, HEADS, HEAD_DIM), positions, 10000.0, HEAD_DIM // 2, interleaved=True)
        k = rotate(k.reshape(s, GLM2_GROUPS, HEAD_DIM), positions, 10000.0, HEAD_DIM // 2, interleaved=True)
        v = v.reshape(s, GLM2_GROUPS, HEAD_DIM)
        x = x + attention(q, k, v) @ w[p + "self_attention.dense.weight"].T
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        gate, up = np.split(h @ w[p + "mlp.dense_h_to_4h.weight"].T, 2, axis=-1)
        x = x + (silu(gate) * up) @ w[p + "mlp.dense_4h_to_h.weight"].T
    expected = rms_norm(x, w["transformer.encoder.final_layernorm.weight"], eps) @ w["transformer.output_layer.weight"].T
    difference = np.abs(logits - expected).max()
    print(f"ChatGLM2: max |logits difference| {difference:.2e}")
    assert difference < 1e-4


# ---- ChatGLM-6B: GLM block, 2D rotary, prefix-LM mask ----

GLM_FFN = 96


def glm_positions(s, prefix_length):
    """ChatGLM-6B's position and block-position ids for a context of prefix_length tokens."""
    if prefix_length == 0:
        return np.arange(s, dtype=np.float64), np.zeros(s)
    index = np.arange(s)
    positions = np.where(index < prefix_length, index, prefix_length - 1)
    blocks = np.where(index < prefix_length, 0, index - prefix_length + 1)
    return positions.astype(np.float64), blocks.astype(np.float64)


@pytest.mark.parametrize("prefix_length", [0, 6])
def test_chatglm_6b_matches_reference(prefix_length, tmp_path):
    shapes = {"transformer.word_embeddings.weight": (VOCAB, HIDDEN), "transformer.final_layernorm.weight": (HIDDEN,),
              "transformer.final_layernorm.bias": (HIDDEN,), "lm_head.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"transformer.layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            shapes.update({p + norm + ".weight": (HIDDEN,), p + norm + ".bias": (HIDDEN,)})
        shapes.update({
            p + "attention.query_key_value.weight": (3 * HIDDEN, HIDDEN),
            p + "attention.query_key_value.bias": (3 * HIDDEN,),
            p + "attention.dense.weight": (HIDDEN, HIDDEN), p + "attention.dense.bias": (HIDDEN,),
            p + "mlp.dense_h_to_4h.weight": (GLM_FFN, HIDDEN), p + "mlp.dense_h_to_4h.bias": (GLM_FFN,),
            p + "mlp.dense_4h_to_h.weight": (HIDDEN, GLM_FFN), p + "mlp.dense_4h_to_h.bias": (HIDDEN,),
        })
    tensors = random_tensors(shapes, seed=4)
    config_json = dict(
        model_type="chatglm", vocab_size=VOCAB, hidden_size=HIDDEN, inner_hidden_size=GLM_FFN, num_layers=LAYERS,
        num_attention_heads=HEADS, layernorm_epsilon=1e-5, max_sequence_length=64, position_encoding_2d=True,
    )
    save_checkpoint(tmp_path, config_json, tensors)
    logits, model = fleet_logits(tmp_path, TOKENS, prefix_length=prefix_length)
    assert model.config.model_type == "chatglm"

    w, s, eps = w64(tensors), len(TOKENS), 1e-5
    alpha = math.sqrt(2 * LAYERS)
    positions, blocks = glm_positions(s, prefix_length)
    half = HEAD_DIM // 2
    x = w["transformer.word_embeddings.weight"][TOKENS]
    for i in range(LAYERS):
        p = f"transformer.layers.{i}."
        h = layer_norm(x, w[p + "input_layernorm.weight"], w[p + "input_layernorm.bias"], eps)
        qkv = (h @ w[p + "attention.query_key_value.weight"].T + w[p + "attention.query_key_value.bias"])
        qkv = qkv.reshape(s, HEADS, 3 * HEAD_DIM)  # per head [q | k | v]
        q, k, v = np.split(qkv, 3, axis=-1)
        q = np.concatenate([rotate(q[..., :half], positions, 10000.0, half), rotate(q[..., half:], blocks, 10000.0, half)], -1)
        k = np.concatenate([rotate(k[..., :half], positions, 10000.0, half), rotate(k[..., half:], blocks, 10000.0, half)], -1)
        out = attention(q, k, v, prefix_length=prefix_length) @ w[p + "attention.dense.weight"].T + w[p + "attention.dense.bias"]
        x = alpha * h + out
        h = layer_norm(x, w[p + "post_attention_layernorm.weight"], w[p + "post_attention_layernorm.bias"], eps)
        inner = gelu_tanh(h @ w[p + "mlp.dense_h_to_4h.weight"].T + w[p + "mlp.dense_h_to_4h.bias"])
        x = alpha * h + inner @ w[p + "mlp.dense_4h_to_h.weight"].T + w[p + "mlp.dense_4h_to_h.bias"]
    x = layer_norm(x, w["transformer.final_layernorm.weight"], w["transformer.final_layernorm.bias"], eps)
    expected = x @ w["lm_head.weight"].T
    difference = np.abs(logits - expected).max()
    print(f"ChatGLM-6B (prefix {prefix_length}): max |logits difference| {difference:.2e}")
    assert difference < 1e-4


# ---- GLM-130B: GLM block with 1D rotary and GeGLU, tied output ----

def test_glm_130b_block_matches_reference():
    config = ModelConfig(
        model_type="glm", vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=GLM_FFN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, max_position_embeddings=64, rms_norm_eps=1e-5, norm_type="layernorm",
        hidden_act="gelu", gated_mlp=True, mlp_bias=True, attention_bias=True, attention_out_bias=True,
        tie_word_embeddings=True,
    )
    paddle.seed(5)
    model = build_model(config)
    with paddle.no_grad():
        for name, parameter in model.named_parameters():
            parameter.set_value(parameter + 0.1 * paddle.randn(parameter.shape))
    model.eval()
    logits = model(paddle.to_tensor(TOKENS[None])).numpy()[0]

    w = {k: v.numpy().astype(np.float64) for k, v in model.state_dict().items()}
    s, eps, alpha = len(TOKENS), 1e-5, math.sqrt(2 * LAYERS)
    positions = np.arange(s, dtype=np.float64)
    x = w["glm.embed_tokens.weight"][TOKENS]
    for i in range(LAYERS):
        p = f"glm.layers.{i}."

        def linear(name, h):
            return h @ w[p + name + ".weight"] + w[p + name + ".bias"]  # Paddle layout [in, out]

        h = layer_norm(x, w[p + "input_layernorm.weight"], w[p + "input_layernorm.bias"], eps)
        q, k, v = (linear(f"self_attn.{n}_proj", h).reshape(s, HEADS, HEAD_DIM) for n in "qkv")
        q, k = rotate(q, positions, 10000.0, HEAD_DIM), rotate(k, positions, 10000.0, HEAD_DIM)
        x = alpha * h + linear("self_attn.o_proj", attention(q, k, v))
        h = layer_norm(x, w[p + "post_attention_layernorm.weight"], w[p + "post_attention_layernorm.bias"], eps)
        # GeGLU: x1 * gelu(x2), with x2 the gate projection.
        x = alpha * h + linear("mlp.down_proj", linear("mlp.up_proj", h) * gelu_erf(linear("mlp.gate_proj", h)))
    x = layer_norm(x, w["glm.norm.weight"], w["glm.norm.bias"], eps)
    expected = x @ w["glm.embed_tokens.weight"].T
    difference = np.abs(logits - expected).max()
    print(f"GLM-130B block: max |logits difference| {difference:.2e}")
    assert difference < 1e-4


def test_alibi_head_slice_matches_full_attention():
    from fleetlm.models.layers import SelfAttention

    paddle.seed(0)
    full = SelfAttention(16, 4, 4, 4, None, alibi=True)
    x = paddle.randn([1, 5, 16])
    q, k, v = (proj(x).reshape([1, 5, -1, 4]) for proj in (full.q_proj, full.k_proj, full.v_proj))
    expected = full.core_attention(q, k, v).numpy()
    for rank in range(2):
        part = SelfAttention(16, 4, 4, 4, None, alibi=True)
        part.keep_head_slice(rank, 2)
        heads = slice(2 * rank, 2 * rank + 2)
        out = part.core_attention(q[:, :, heads], k[:, :, heads], v[:, :, heads]).numpy()
        np.testing.assert_allclose(out, expected[:, :, heads], atol=1e-6)
