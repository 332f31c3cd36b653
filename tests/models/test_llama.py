"""LLaMA forward against an independent NumPy reference written from the equations."""

import numpy as np
import paddle
import pytest

from fleetlm.models import ModelConfig, build_model
from fleetlm.models.layers import RotaryEmbedding, causal_attention

TINY = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=500.0)


def ref_rms_norm(x, weight, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def ref_rotary(x, base):
    """Rotate each pair (x[i], x[i + d/2]) at position p by p * base**(-2i/d), as a complex product."""
    seq_len, _, head_dim = x.shape
    half = head_dim // 2
    angles = np.arange(seq_len)[:, None] * base ** (-2.0 * np.arange(half) / head_dim)[None, :]  # [s, d/2]
    z = (x[..., :half] + 1j * x[..., half:]) * np.exp(1j * angles)[:, None, :]
    return np.concatenate([z.real, z.imag], axis=-1)


def ref_attention(q, k, v):
    """softmax(q k^T / sqrt(d)) v with a causal mask, one query at a time; q [s, h, d], k/v [s, kv, d]."""
    seq_len, num_heads, head_dim = q.shape
    group = num_heads // k.shape[1]
    out = np.zeros_like(q)
    for h in range(num_heads):
        for t in range(seq_len):
            scores = k[: t + 1, h // group] @ q[t, h] / np.sqrt(head_dim)
            weights = np.exp(scores - scores.max())
            weights /= weights.sum()
            out[t, h] = weights @ v[: t + 1, h // group]
    return out


def ref_llama_logits(state, config, tokens):
    """Forward one sequence through LLaMA in float64 NumPy; Paddle Linear weights are [in, out]."""
    w = {k: v.numpy().astype(np.float64) for k, v in state.items()}
    head_dim = config.hidden_size // config.num_attention_heads
    x = w["llama.embed_tokens.weight"][tokens]
    s = len(tokens)
    for i in range(config.num_hidden_layers):
        p = f"llama.layers.{i}."
        h = ref_rms_norm(x, w[p + "input_layernorm.weight"], config.rms_norm_eps)
        q = (h @ w[p + "self_attn.q_proj.weight"]).reshape(s, -1, head_dim)
        k = (h @ w[p + "self_attn.k_proj.weight"]).reshape(s, -1, head_dim)
        v = (h @ w[p + "self_attn.v_proj.weight"]).reshape(s, -1, head_dim)
        q, k = ref_rotary(q, config.rope_theta), ref_rotary(k, config.rope_theta)
        x = x + ref_attention(q, k, v).reshape(s, -1) @ w[p + "self_attn.o_proj.weight"]
        h = ref_rms_norm(x, w[p + "post_attention_layernorm.weight"], config.rms_norm_eps)
        gate = h @ w[p + "mlp.gate_proj.weight"]
        silu = gate / (1.0 + np.exp(-gate))
        x = x + (silu * (h @ w[p + "mlp.up_proj.weight"])) @ w[p + "mlp.down_proj.weight"]
    x = ref_rms_norm(x, w["llama.norm.weight"], config.rms_norm_eps)
    if config.tie_word_embeddings:
        return x @ w["llama.embed_tokens.weight"].T
    return x @ w["lm_head.weight"]


def test_rotary_matches_formula():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 11, 3, 8)).astype("float32")
    k = rng.standard_normal((2, 11, 1, 8)).astype("float32")
    rotary = RotaryEmbedding(head_dim=8, base=10000.0)
    q_out, k_out = rotary(paddle.to_tensor(q), paddle.to_tensor(k))
    for b in range(2):
        np.testing.assert_allclose(q_out.numpy()[b], ref_rotary(q[b].astype(np.float64), 10000.0), atol=1e-5)
        np.testing.assert_allclose(k_out.numpy()[b], ref_rotary(k[b].astype(np.float64), 10000.0), atol=1e-5)


def test_rotary_keeps_norm_and_position_zero():
    x = paddle.randn([1, 5, 2, 16])
    rotated, _ = RotaryEmbedding(16, 10000.0)(x, x)
    np.testing.assert_allclose(rotated.numpy()[:, 0], x.numpy()[:, 0], atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(rotated.numpy(), axis=-1), np.linalg.norm(x.numpy(), axis=-1), rtol=1e-5)


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
def test_attention_matches_softmax_reference(num_kv_heads):
    rng = np.random.default_rng(1)
    q = rng.standard_normal((2, 9, 4, 8)).astype("float32")
    k = rng.standard_normal((2, 9, num_kv_heads, 8)).astype("float32")
    v = rng.standard_normal((2, 9, num_kv_heads, 8)).astype("float32")
    out = causal_attention(paddle.to_tensor(q), paddle.to_tensor(k), paddle.to_tensor(v), use_flash=False).numpy()
    for b in range(2):
        expected = ref_attention(q[b].astype(np.float64), k[b].astype(np.float64), v[b].astype(np.float64))
        np.testing.assert_allclose(out[b], expected, atol=1e-5)


@pytest.mark.parametrize("tied", [False, True])
def test_llama_logits_match_reference(tied):
    config = ModelConfig(**TINY, tie_word_embeddings=tied)
    paddle.seed(3)
    model = build_model(config)
    model.eval()
    tokens = np.random.default_rng(2).integers(0, config.vocab_size, size=(2, 13))
    logits = model(paddle.to_tensor(tokens)).numpy()
    assert logits.shape == (2, 13, config.vocab_size)
    for b in range(2):
        expected = ref_llama_logits(model.state_dict(), config, tokens[b])
        assert np.abs(logits[b] - expected).max() < 1e-4


def test_loss_is_mean_token_cross_entropy():
    config = ModelConfig(**TINY)
    paddle.seed(4)
    model = build_model(config)
    tokens = np.random.default_rng(5).integers(0, config.vocab_size, size=(3, 10))
    inputs, labels = paddle.to_tensor(tokens[:, :-1]), paddle.to_tensor(tokens[:, 1:])
    loss = float(model(inputs, labels))
    logits = model(inputs).numpy().astype(np.float64)
    log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    expected = -np.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1).mean()
    assert abs(loss - expected) < 1e-5


def test_parameter_names_follow_paddlenlp():
    model = build_model(ModelConfig(**TINY))
    names = set(model.state_dict())
    for expected in ("llama.embed_tokens.weight", "llama.layers.1.self_attn.k_proj.weight",
                     "llama.layers.0.mlp.down_proj.weight", "llama.layers.0.post_attention_layernorm.weight",
                     "llama.norm.weight", "lm_head.weight"):
        assert expected in names
    assert list(model.state_dict()["llama.layers.0.self_attn.k_proj.weight"].shape) == [48, 16]
