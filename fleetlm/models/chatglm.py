"""ChatGLM-6B and GLM-130B (Zeng et al., 2022): the GLM block with DeepNorm residuals.

Each block normalises first and then adds the *normalised* input, scaled by
alpha = sqrt(2 * num_hidden_layers), to the sublayer output (DeepNorm, Wang et al., 2022):

    h = norm1(x);  x = alpha * h + attn(h);  h = norm2(x);  x = alpha * h + mlp(h)

A final LayerNorm follows the last block. ChatGLM-6B uses 2D rotary positions (half of each head
rotated by the token position, half by the block position), a GELU MLP (tanh approximation) and an
untied output layer. GLM-130B uses 1D rotary over the whole head, a GeGLU MLP (x1 * gelu(x2)) and
the token embedding as output layer. ChatGLM2-6B is a different, LLaMA-like block (fleetlm.models.llama).

Attention uses a prefix-LM mask: the first ``prefix_length`` tokens (the context, up to and
including GLM's [gMASK] token) attend to each other in both directions, the rest causally.
With ``prefix_length`` 0 (plain pretraining batches) the mask is causal.
"""

import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from paddle.distributed.fleet.utils import recompute

from fleetlm.models.config import ModelConfig
from fleetlm.models.layers import RotaryEmbedding, SelfAttention, build_mlp, build_norm
from fleetlm.models.llama import causal_lm_loss, init_weights


class GLMRotary(nn.Layer):
    """1D rotary over the whole head, or GLM's 2D rotary: position ids on the first half, block ids on the second."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.two_d = config.position_encoding_2d
        self.rotary = RotaryEmbedding(config.rotary_dim, config.rope_theta)

    def forward(self, q: paddle.Tensor, k: paddle.Tensor, position_ids: paddle.Tensor = None):
        """Rotate q, k [b, s, h, d]; ``position_ids`` is [2, b, s] (positions, block positions).

        Without ``position_ids`` the positions of a batch with no prefix are derived from q's shape.
        Attention receives the whole sequence even when sequence parallelism splits the block's input,
        so the length read here is the true sequence length.
        """
        if position_ids is None:
            position_ids = glm_position_ids(q.shape[0], q.shape[1], prefix_length=0)
        if not self.two_d:
            return self.rotary(q, k, position_ids[0])
        q1, q2 = q.chunk(2, axis=-1)
        k1, k2 = k.chunk(2, axis=-1)
        q1, k1 = self.rotary(q1, k1, position_ids[0])
        q2, k2 = self.rotary(q2, k2, position_ids[1])
        return paddle.concat([q1, q2], axis=-1), paddle.concat([k1, k2], axis=-1)


def glm_position_ids(batch_size: int, seq_len: int, prefix_length: int) -> paddle.Tensor:
    """Return [2, b, s] position ids for a prefix of ``prefix_length`` context tokens.

    ChatGLM-6B's rule: context tokens take positions 0..P-1 and block position 0; every later token
    takes the position of the mask token (P - 1) and block positions 1, 2, ... With no prefix
    (P = 0) every token is context-like: positions 0..s-1 and block position 0.
    """
    index = paddle.arange(seq_len, dtype="int64")
    if prefix_length == 0:
        positions, blocks = index, paddle.zeros([seq_len], dtype="int64")
    else:
        positions = paddle.clip(index, max=prefix_length - 1)
        blocks = paddle.clip(index - prefix_length + 1, min=0)
    both = paddle.stack([positions, blocks])  # [2, s]
    return both[:, None, :].expand([2, batch_size, seq_len])


class GLMBlock(nn.Layer):
    """The DeepNorm block of the module docstring."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.alpha = (2.0 * config.num_hidden_layers) ** 0.5
        self.input_layernorm = build_norm(config)
        self.self_attn = SelfAttention(
            config.hidden_size,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
            GLMRotary(config),
            bias=config.attention_bias,
            use_flash_attention=config.use_flash_attention,
            attention_dropout=config.attention_probs_dropout_prob,
            out_bias=config.attention_out_bias,
        )
        self.post_attention_layernorm = build_norm(config)
        self.mlp = build_mlp(config)
        self.dropout = config.hidden_dropout_prob

    def forward(
        self, x: paddle.Tensor, position_ids: paddle.Tensor = None, prefix_length: int = 0
    ) -> paddle.Tensor:
        # A pipeline stage passes only x. Then the rotary derives the positions of a batch with no
        # prefix, and a prefix needs them derived here, from the sequence in x.
        if position_ids is None and prefix_length > 0:
            position_ids = glm_position_ids(x.shape[0], x.shape[1], prefix_length)
        h = self.input_layernorm(x)
        out = self.self_attn(h, position_ids, prefix_length)
        x = self.alpha * h + F.dropout(out, p=self.dropout, training=self.training)
        h = self.post_attention_layernorm(x)
        return self.alpha * h + F.dropout(self.mlp(h), p=self.dropout, training=self.training)


class GLMModel(nn.Layer):
    """Token embedding, GLM blocks and the final LayerNorm; returns hidden states [b, s, hidden_size]."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.LayerList([GLMBlock(config) for _ in range(config.num_hidden_layers)])
        self.norm = build_norm(config)

    def forward(self, input_ids: paddle.Tensor, prefix_length: int = 0) -> paddle.Tensor:
        b, s = input_ids.shape
        position_ids = glm_position_ids(b, s, prefix_length)
        x = self.embed_tokens(input_ids)  # [b, s, hidden_size]
        for layer in self.layers:
            if self.config.recompute and self.training:
                # Full-block recompute: keep only the block input, rerun the block in backward.
                x = recompute(layer, x, position_ids, prefix_length)
            else:
                x = layer(x, position_ids, prefix_length)
        return self.norm(x)


class GLMForCausalLM(nn.Layer):
    """GLMModel plus the output layer; ``forward(input_ids, labels, prefix_length)`` returns the mean token loss."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.glm = GLMModel(config)
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias_attr=False)
        init_weights(self, config.initializer_range)

    def logits(self, input_ids: paddle.Tensor, prefix_length: int = 0) -> paddle.Tensor:
        hidden = self.glm(input_ids, prefix_length)
        if self.lm_head is None:
            return paddle.matmul(hidden, self.glm.embed_tokens.weight, transpose_y=True)  # [b, s, vocab_size]
        return self.lm_head(hidden)

    def forward(self, input_ids: paddle.Tensor, labels: paddle.Tensor = None, prefix_length: int = 0) -> paddle.Tensor:
        """Logits, or with ``labels`` the mean loss over every label (mask context labels with your own loss)."""
        logits = self.logits(input_ids, prefix_length)
        if labels is None:
            return logits
        return causal_lm_loss(logits, labels)
