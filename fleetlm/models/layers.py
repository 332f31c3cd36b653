"""Layers shared by the decoder-only families: RMSNorm, rotary embedding, SwiGLU MLP, attention.

Shapes use one vocabulary: ``batch_size (b), seq_len (s), num_heads (h), num_kv_heads, head_dim (d),
hidden_size``. Attention reads the number of heads from the projection's output width instead of
the config, so the same code runs when tensor parallelism has replaced a projection by a shard that
produces ``num_heads / tensor_parallel_degree`` heads.
"""

import math
from typing import Dict, Optional, Tuple

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from fleetlm.models import kernels


class RMSNorm(nn.Layer):
    """Root-mean-square layer norm (Zhang & Sennrich, 2019): x / rms(x) * weight, computed in fp32."""

    def __init__(self, hidden_size: int, eps: float, use_fused: bool = False):
        super().__init__()
        self.eps = eps
        self.weight = self.create_parameter([hidden_size], default_initializer=nn.initializer.Constant(1.0))
        self.use_fused = kernels.use_fused_rms_norm(use_fused)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        if self.use_fused:
            from paddle.incubate.nn.functional import fused_rms_norm

            return fused_rms_norm(x, self.weight, None, self.eps, begin_norm_axis=x.ndim - 1)[0]
        x_fp32 = x.astype("float32")
        variance = x_fp32.pow(2).mean(axis=-1, keepdim=True)
        normed = x_fp32 * paddle.rsqrt(variance + self.eps)
        return normed.astype(self.weight.dtype) * self.weight


class RotaryEmbedding(nn.Layer):
    """Rotary position embedding (Su et al., 2021, RoFormer) in the half-split layout of LLaMA.

    Frequency i of a head of size d is ``base ** (-2i / d)``; position p rotates the pair
    (x[i], x[i + d/2]) by the angle ``p * freq_i``. The layer has no state: the cos/sin tables
    are a function of (head_dim, seq_len, base) and are shared by all layers through a cache.
    """

    def __init__(self, head_dim: int, base: float, use_fused: bool = False):
        super().__init__()
        self.head_dim = head_dim
        self.base = base
        self.use_fused = kernels.use_fused_rope(use_fused)

    def forward(self, q: paddle.Tensor, k: paddle.Tensor) -> Tuple[paddle.Tensor, paddle.Tensor]:
        """Rotate q [b, s, h, d] and k [b, s, num_kv_heads, d] by their positions 0..s-1."""
        cos, sin = rotary_tables(self.head_dim, q.shape[1], self.base)
        cos, sin = cos.astype(q.dtype), sin.astype(q.dtype)
        if self.use_fused:
            from paddle.incubate.nn.functional import fused_rotary_position_embedding

            q, k, _ = fused_rotary_position_embedding(q, k, None, sin=sin, cos=cos, use_neox_rotary_style=True)
            return q, k
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


_ROTARY_CACHE: Dict[Tuple[int, int, float], Tuple[paddle.Tensor, paddle.Tensor]] = {}


def rotary_tables(head_dim: int, seq_len: int, base: float) -> Tuple[paddle.Tensor, paddle.Tensor]:
    """Return fp32 (cos, sin) tables of shape [1, seq_len, 1, head_dim] for positions 0..seq_len-1."""
    key = (head_dim, seq_len, base)
    if key not in _ROTARY_CACHE:
        with paddle.no_grad():
            inv_freq = 1.0 / (base ** (paddle.arange(0, head_dim, 2, dtype="float32") / head_dim))
            positions = paddle.arange(seq_len, dtype="float32")
            freqs = paddle.outer(positions, inv_freq)  # [s, d/2]
            angles = paddle.concat([freqs, freqs], axis=-1)  # [s, d]
            _ROTARY_CACHE[key] = (angles.cos()[None, :, None, :], angles.sin()[None, :, None, :])
    return _ROTARY_CACHE[key]


def rotate_half(x: paddle.Tensor) -> paddle.Tensor:
    x1, x2 = x.chunk(2, axis=-1)
    return paddle.concat([-x2, x1], axis=-1)


def apply_rotary(x: paddle.Tensor, cos: paddle.Tensor, sin: paddle.Tensor) -> paddle.Tensor:
    return x * cos + rotate_half(x) * sin


class SwiGLUMLP(nn.Layer):
    """Gated MLP of LLaMA (Shazeer, 2020): down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias_attr=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias_attr=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias_attr=bias)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def repeat_kv(x: paddle.Tensor, num_repeats: int) -> paddle.Tensor:
    """Repeat each key/value head ``num_repeats`` times: [b, s, kv, d] -> [b, s, kv * num_repeats, d]."""
    if num_repeats == 1:
        return x
    b, s, kv, d = x.shape
    return x.unsqueeze(3).expand([b, s, kv, num_repeats, d]).reshape([b, s, kv * num_repeats, d])


def causal_attention(
    q: paddle.Tensor,
    k: paddle.Tensor,
    v: paddle.Tensor,
    use_flash: bool,
    dropout: float = 0.0,
    training: bool = True,
) -> paddle.Tensor:
    """Causal scaled-dot-product attention over q, k, v [b, s, h, d]; returns [b, s, h, d].

    Keys and values may have fewer heads than queries (grouped-query attention); they are repeated
    to the query head count first. ``use_flash`` comes from ``kernels.use_flash_attention``.
    """
    num_repeats = q.shape[2] // k.shape[2]
    k = repeat_kv(k, num_repeats)
    v = repeat_kv(v, num_repeats)
    if use_flash:
        from paddle.nn.functional.flash_attention import flash_attention

        out, _ = flash_attention(q, k, v, dropout=dropout, causal=True, training=training)
        return out

    head_dim = q.shape[-1]
    q = q.transpose([0, 2, 1, 3])  # [b, h, s, d]
    k = k.transpose([0, 2, 1, 3])
    v = v.transpose([0, 2, 1, 3])
    scores = paddle.matmul(q, k, transpose_y=True) / math.sqrt(head_dim)  # [b, h, s, s]
    scores = scores + causal_mask(q.shape[2], scores.dtype)
    probs = F.softmax(scores.astype("float32"), axis=-1).astype(q.dtype)
    if dropout > 0.0:
        probs = F.dropout(probs, p=dropout, training=training)
    out = paddle.matmul(probs, v)  # [b, h, s, d]
    return out.transpose([0, 2, 1, 3])


def causal_mask(seq_len: int, dtype) -> paddle.Tensor:
    """Return an additive [s, s] mask: 0 where key position <= query position, a large negative elsewhere."""
    allowed = paddle.tril(paddle.ones([seq_len, seq_len], dtype="bool"))
    # finfo.min rather than -inf keeps a fully masked row finite (it cannot occur with a causal
    # mask, but padding masks added later would produce NaN with -inf).
    return paddle.where(allowed, paddle.zeros([], dtype), paddle.full([], paddle.finfo(dtype).min, dtype))


class SelfAttention(nn.Layer):
    """Multi-head self-attention with optional grouped-query keys/values and rotary positions."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        rotary: Optional[RotaryEmbedding],
        bias: bool = False,
        use_flash_attention: bool = False,
        attention_dropout: float = 0.0,
    ):
        super().__init__()
        self.head_dim = head_dim
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias_attr=bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias_attr=bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias_attr=bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias_attr=False)
        self.rotary = rotary
        self.use_flash = kernels.use_flash_attention(use_flash_attention)
        self.attention_dropout = attention_dropout

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        b, s = x.shape[0], x.shape[1]
        # -1 heads: a tensor-parallel shard of q_proj yields num_heads / tp heads.
        q = self.q_proj(x).reshape([b, s, -1, self.head_dim])  # [b, s, h, d]
        k = self.k_proj(x).reshape([b, s, -1, self.head_dim])  # [b, s, num_kv_heads, d]
        v = self.v_proj(x).reshape([b, s, -1, self.head_dim])
        if self.rotary is not None:
            q, k = self.rotary(q, k)
        out = causal_attention(q, k, v, self.use_flash, self.attention_dropout, self.training)
        return self.o_proj(out.reshape([b, s, -1]))  # [b, s, hidden_size]
