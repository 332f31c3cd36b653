"""Layers shared by the decoder-only families: norms, rotary and ALiBi positions, MLPs, attention.

Shapes use one vocabulary: ``batch_size (b), seq_len (s), num_heads (h), num_kv_heads, head_dim (d),
hidden_size``. Attention reads the number of heads from the projection's output width instead of
the config, so the same code runs when tensor parallelism has replaced a projection by a shard that
produces ``num_heads / tensor_parallel_degree`` heads.
"""

import math
from typing import Dict, Optional, Tuple

import numpy as np
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

    Frequency i of a rotary dimension r is ``base ** (-2i / r)``. Position p rotates the pair
    (x[i], x[i + r/2]) by the angle ``p * freq_i``. With ``interleaved`` (GPT-J's layout, used by
    ChatGLM2) it rotates the pair (x[2i], x[2i+1]) instead. Only the first ``rotary_dim`` dimensions
    of a head rotate and the rest pass through, so ChatGLM2 rotates half of each head. The layer has
    no state: the cos/sin tables depend only on (rotary_dim, seq_len, base) and are shared through a cache.
    """

    def __init__(
        self,
        head_dim: int,
        base: float,
        use_fused: bool = False,
        rotary_dim: Optional[int] = None,
        interleaved: bool = False,
    ):
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim or head_dim
        self.base = base
        self.interleaved = interleaved
        plain_layout = self.rotary_dim == head_dim and not interleaved
        self.use_fused = plain_layout and kernels.use_fused_rope(use_fused)

    def forward(
        self, q: paddle.Tensor, k: paddle.Tensor, position_ids: Optional[paddle.Tensor] = None
    ) -> Tuple[paddle.Tensor, paddle.Tensor]:
        """Rotate q [b, s, h, d] and k [b, s, num_kv_heads, d] by positions 0..s-1 or ``position_ids`` [b, s]."""
        if position_ids is not None or self.rotary_dim != self.head_dim or self.interleaved:
            return self._rotate_general(q, k, position_ids)
        cos, sin = rotary_tables(self.head_dim, q.shape[1], self.base)
        cos, sin = cos.astype(q.dtype), sin.astype(q.dtype)
        if self.use_fused:
            from paddle.incubate.nn.functional import fused_rotary_position_embedding

            q, k, _ = fused_rotary_position_embedding(q, k, None, sin=sin, cos=cos, use_neox_rotary_style=True)
            return q, k
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

    def _rotate_general(self, q, k, position_ids):
        r = self.rotary_dim
        seq_len = q.shape[1] if position_ids is None else int(position_ids.max()) + 1
        cos, sin = rotary_tables(r, seq_len, self.base, self.interleaved)
        if position_ids is not None:
            # Gather each token's row: [1, max_pos, 1, r] -> [b, s, 1, r].
            cos = paddle.gather(cos[0, :, 0], position_ids.reshape([-1])).reshape([*position_ids.shape, 1, r])
            sin = paddle.gather(sin[0, :, 0], position_ids.reshape([-1])).reshape([*position_ids.shape, 1, r])
        cos, sin = cos.astype(q.dtype), sin.astype(q.dtype)
        rotate = rotate_pairs if self.interleaved else rotate_half

        def apply(x):
            if r == self.head_dim:
                return x * cos + rotate(x) * sin
            rotated, passed = x[..., :r], x[..., r:]
            return paddle.concat([rotated * cos + rotate(rotated) * sin, passed], axis=-1)

        return apply(q), apply(k)


_ROTARY_CACHE: Dict[Tuple[int, int, float, bool], Tuple[paddle.Tensor, paddle.Tensor]] = {}


def rotary_tables(
    head_dim: int, seq_len: int, base: float, interleaved: bool = False
) -> Tuple[paddle.Tensor, paddle.Tensor]:
    """Return fp32 (cos, sin) tables of shape [1, seq_len, 1, head_dim] for positions 0..seq_len-1.

    ``head_dim`` is the rotated width. Column j contains frequency j mod d/2 in the half-split
    layout (for ``rotate_half``) and frequency j // 2 in the interleaved layout (for ``rotate_pairs``).
    """
    key = (head_dim, seq_len, base, interleaved)
    if key not in _ROTARY_CACHE:
        with paddle.no_grad():
            inv_freq = 1.0 / (base ** (paddle.arange(0, head_dim, 2, dtype="float32") / head_dim))
            positions = paddle.arange(seq_len, dtype="float32")
            freqs = paddle.outer(positions, inv_freq)  # [s, d/2]
            if interleaved:
                angles = paddle.stack([freqs, freqs], axis=-1).reshape([seq_len, head_dim])  # [s, d]
            else:
                angles = paddle.concat([freqs, freqs], axis=-1)  # [s, d]
            _ROTARY_CACHE[key] = (angles.cos()[None, :, None, :], angles.sin()[None, :, None, :])
    return _ROTARY_CACHE[key]


def rotate_half(x: paddle.Tensor) -> paddle.Tensor:
    x1, x2 = x.chunk(2, axis=-1)
    return paddle.concat([-x2, x1], axis=-1)


def rotate_pairs(x: paddle.Tensor) -> paddle.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): the interleaved counterpart of rotate_half."""
    shape = x.shape
    pairs = x.reshape([*shape[:-1], shape[-1] // 2, 2])
    return paddle.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(shape)


def apply_rotary(x: paddle.Tensor, cos: paddle.Tensor, sin: paddle.Tensor) -> paddle.Tensor:
    return x * cos + rotate_half(x) * sin


def gelu_tanh(x: paddle.Tensor) -> paddle.Tensor:
    """GELU with the tanh approximation (Hendrycks & Gimpel, 2016), used by GPT-2, BLOOM and ChatGLM-6B."""
    return F.gelu(x, approximate=True)


# Keys are the hidden_act values of Hugging Face's config.json files.
ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_new": gelu_tanh, "relu": F.relu}


class SwiGLUMLP(nn.Layer):
    """Gated MLP (Shazeer, 2020): down(act(gate(x)) * up(x)); SwiGLU with silu (LLaMA), GeGLU with gelu."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False, activation: str = "silu",
                 use_fused: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias_attr=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias_attr=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias_attr=bias)
        self.act = ACTIVATIONS[activation]
        # The fused kernel computes silu(gate) * up only, so GeGLU always takes the plain path.
        self.use_fused = activation == "silu" and kernels.use_fused_swiglu(use_fused)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        if self.use_fused:
            return self.down_proj(F.swiglu(self.gate_proj(x), self.up_proj(x)))
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class MLP(nn.Layer):
    """Two-layer MLP of GPT-2, OPT and BLOOM: down(act(up(x)))."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool, activation: str):
        super().__init__()
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias_attr=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias_attr=bias)
        self.act = ACTIVATIONS[activation]

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.down_proj(self.act(self.up_proj(x)))


def build_mlp(config) -> nn.Layer:
    """Build the MLP a ModelConfig names: gated (gate/up/down) or plain (up/down)."""
    if config.gated_mlp:
        return SwiGLUMLP(config.hidden_size, config.intermediate_size, config.mlp_bias, config.hidden_act,
                         config.use_fused_swiglu)
    return MLP(config.hidden_size, config.intermediate_size, config.mlp_bias, config.hidden_act)


def build_norm(config, hidden_size: Optional[int] = None) -> nn.Layer:
    """Build the norm a ModelConfig names: RMSNorm, or LayerNorm with weight and bias."""
    size = hidden_size or config.hidden_size
    if config.norm_type == "layernorm":
        return nn.LayerNorm(size, epsilon=config.rms_norm_eps)
    return RMSNorm(size, config.rms_norm_eps, config.use_fused_rms_norm)


def alibi_slopes(num_heads: int) -> np.ndarray:
    """ALiBi head slopes (Press et al., 2022): a geometric series starting at 2 ** (-8 / n).

    For a head count that is not a power of two, the first 2 ** floor(log2(h)) heads take that
    series and the remaining heads take every other slope of the series for twice that count, as
    BLOOM and Baichuan-13B do.
    """
    def series(n):
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    closest = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = series(closest)
    if closest < num_heads:
        slopes += series(2 * closest)[0::2][: num_heads - closest]
    return np.asarray(slopes, dtype=np.float32)


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
    slopes: Optional[paddle.Tensor] = None,
    prefix_length: int = 0,
) -> paddle.Tensor:
    """Causal scaled-dot-product attention over q, k, v [b, s, h, d]; returns [b, s, h, d].

    Keys and values may have fewer heads than queries (grouped-query attention); they are repeated
    to the query head count first. ``use_flash`` comes from ``kernels.use_flash_attention``.
    ``slopes`` [h] adds ALiBi's bias -slope * (i - j) to the score of query i and key j.
    The first ``prefix_length`` positions are visible to every query (GLM's prefix-LM mask).
    NOTE: ALiBi and a prefix always take the plain path, because Paddle's flash_attention takes
    neither a bias nor a non-causal mask.
    """
    num_repeats = q.shape[2] // k.shape[2]
    k = repeat_kv(k, num_repeats)
    v = repeat_kv(v, num_repeats)
    if use_flash and slopes is None and prefix_length == 0:
        from paddle.nn.functional.flash_attention import flash_attention

        out, _ = flash_attention(q, k, v, dropout=dropout, causal=True, training=training)
        return out

    head_dim = q.shape[-1]
    q = q.transpose([0, 2, 1, 3])  # [b, h, s, d]
    k = k.transpose([0, 2, 1, 3])
    v = v.transpose([0, 2, 1, 3])
    scores = paddle.matmul(q, k, transpose_y=True) / math.sqrt(head_dim)  # [b, h, s, s]
    seq_len = q.shape[2]
    if slopes is not None:
        positions = paddle.arange(seq_len, dtype="float32")
        distance = (positions[:, None] - positions[None, :]).astype(scores.dtype)  # [s, s], i - j
        scores = scores - slopes.astype(scores.dtype)[:, None, None] * distance  # [b, h, s, s]
    scores = scores + causal_mask(seq_len, scores.dtype, prefix_length)
    probs = F.softmax(scores.astype("float32"), axis=-1).astype(q.dtype)
    if dropout > 0.0:
        probs = F.dropout(probs, p=dropout, training=training)
    out = paddle.matmul(probs, v)  # [b, h, s, d]
    return out.transpose([0, 2, 1, 3])


def causal_mask(seq_len: int, dtype, prefix_length: int = 0) -> paddle.Tensor:
    """Return an additive [s, s] mask: 0 where key position <= query position, a large negative elsewhere.

    With ``prefix_length`` P, keys 0..P-1 are visible to every query as well (bidirectional prefix).
    """
    allowed = paddle.tril(paddle.ones([seq_len, seq_len], dtype="bool"))
    if prefix_length > 0:
        in_prefix = (paddle.arange(seq_len) < prefix_length)[None, :]
        allowed = paddle.logical_or(allowed, in_prefix.expand([seq_len, seq_len]))
    # finfo.min rather than -inf keeps a fully masked row finite (it cannot occur with a causal
    # mask, but padding masks added later would produce NaN with -inf).
    return paddle.where(allowed, paddle.zeros([], dtype), paddle.full([], paddle.finfo(dtype).min, dtype))


class SelfAttention(nn.Layer):
    """Multi-head self-attention with optional grouped-query keys/values and rotary or ALiBi positions.

    Fused checkpoint projections (W_pack, c_attn, query_key_value) are split into q/k/v_proj when
    weights are imported (fleetlm.models.weights), so tensor parallelism splits every family alike.
    """

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
        out_bias: bool = False,
        alibi: bool = False,
    ):
        super().__init__()
        self.head_dim = head_dim
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias_attr=bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias_attr=bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias_attr=bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias_attr=out_bias)
        self.rotary = rotary
        self.use_flash = kernels.use_flash_attention(use_flash_attention)
        self.attention_dropout = attention_dropout
        # ALiBi slopes of this layer's heads, [num_heads].
        # Tensor parallelism calls keep_head_slice on each rank (fleetlm.parallel.tensor_parallel).
        slopes = paddle.to_tensor(alibi_slopes(num_heads)) if alibi else None
        self.register_buffer("alibi_slopes", slopes, persistable=False)

    def keep_head_slice(self, rank: int, degree: int) -> None:
        """Keep the ALiBi slopes of tensor-parallel rank ``rank`` of ``degree``: its contiguous block of heads."""
        if self.alibi_slopes is not None:
            per_rank = self.alibi_slopes.shape[0] // degree
            self.alibi_slopes = self.alibi_slopes[rank * per_rank:(rank + 1) * per_rank]

    def forward(
        self, x: paddle.Tensor, position_ids: Optional[paddle.Tensor] = None, prefix_length: int = 0
    ) -> paddle.Tensor:
        b, s = x.shape[0], x.shape[1]
        # -1 heads: a tensor-parallel shard of q_proj yields num_heads / tp heads.
        q = self.q_proj(x).reshape([b, s, -1, self.head_dim])  # [b, s, h, d]
        k = self.k_proj(x).reshape([b, s, -1, self.head_dim])  # [b, s, num_kv_heads, d]
        v = self.v_proj(x).reshape([b, s, -1, self.head_dim])
        if self.rotary is not None:
            q, k = self.rotary(q, k, position_ids) if position_ids is not None else self.rotary(q, k)
        out = self.core_attention(q, k, v, prefix_length)
        return self.o_proj(out.reshape([b, s, -1]))  # [b, s, hidden_size]

    def core_attention(
        self, q: paddle.Tensor, k: paddle.Tensor, v: paddle.Tensor, prefix_length: int = 0
    ) -> paddle.Tensor:
        """softmax(QK^T / sqrt(d)) V on [b, s, h, d]; a method so recompute can wrap it alone (core_attn)."""
        return causal_attention(
            q, k, v, self.use_flash, self.attention_dropout, self.training, self.alibi_slopes, prefix_length
        )
