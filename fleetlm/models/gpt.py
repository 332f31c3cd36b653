"""GPT-2/GPT-3, OPT and BLOOM: the LayerNorm decoder with biases and a two-layer MLP.

One block serves the three families; their differences are config switches:

* GPT-2 and GPT-3 (Radford et al., 2019; Brown et al., 2020): learned absolute positions, pre-norm
  LayerNorm, GELU (tanh approximation), tied output layer.
* OPT (Zhang et al., 2022): learned positions whose table starts at index 2 (``position_offset``),
  ReLU, pre-norm. OPT-350m is post-norm instead (``pre_norm`` false: norm(x + f(x)), no final norm),
  and its 512-wide token embedding is projected in and out of the 1024-wide blocks.
* BLOOM (BigScience, 2022): no position embedding but ALiBi in attention, and a LayerNorm right
  after the token embedding.

Parameter names follow the LLaMA file's (``gpt.layers.0.self_attn.q_proj.weight``, ``mlp.up_proj``,
``mlp.down_proj``) so that the parallel plans and the weight import treat every family alike.
"""

import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from paddle.distributed.fleet.utils import recompute

from fleetlm.models.config import ModelConfig
from fleetlm.models.layers import SelfAttention, build_mlp, build_norm
from fleetlm.models.llama import causal_lm_loss, init_weights


class GPTBlock(nn.Layer):
    """Pre-norm: x + attn(norm(x)), x + mlp(norm(x)); post-norm: norm(x + attn(x)), norm(x + mlp(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.pre_norm = config.pre_norm
        self.input_layernorm = build_norm(config)
        self.self_attn = SelfAttention(
            config.hidden_size,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
            rotary=None,
            bias=config.attention_bias,
            use_flash_attention=config.use_flash_attention,
            attention_dropout=config.attention_probs_dropout_prob,
            out_bias=config.attention_out_bias,
            alibi=config.position_embedding_type == "alibi",
        )
        self.post_attention_layernorm = build_norm(config)
        self.mlp = build_mlp(config)
        self.dropout = config.hidden_dropout_prob

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        if self.pre_norm:
            h = self.self_attn(self.input_layernorm(x))
            x = x + F.dropout(h, p=self.dropout, training=self.training)
            h = self.mlp(self.post_attention_layernorm(x))
            return x + F.dropout(h, p=self.dropout, training=self.training)
        h = self.self_attn(x)
        x = self.input_layernorm(x + F.dropout(h, p=self.dropout, training=self.training))
        h = self.mlp(x)
        return self.post_attention_layernorm(x + F.dropout(h, p=self.dropout, training=self.training))


class GPTModel(nn.Layer):
    """Embeddings, blocks and final norm; returns hidden states [b, s, hidden_size] (or the embedding width)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        embed_dim = config.word_embed_proj_dim or config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, embed_dim)
        self.project_in = self.project_out = None
        if embed_dim != config.hidden_size:
            self.project_in = nn.Linear(embed_dim, config.hidden_size, bias_attr=False)
            self.project_out = nn.Linear(config.hidden_size, embed_dim, bias_attr=False)
        self.embed_positions = None
        if config.position_embedding_type == "learned":
            num_positions = config.max_position_embeddings + config.position_offset
            self.embed_positions = nn.Embedding(num_positions, config.hidden_size)
        self.embed_layernorm = build_norm(config) if config.embedding_layernorm else None
        self.layers = nn.LayerList([GPTBlock(config) for _ in range(config.num_hidden_layers)])
        # Post-norm blocks already end in a norm (OPT-350m has no final norm).
        self.norm = build_norm(config) if config.pre_norm else None
        self.dropout = config.hidden_dropout_prob

    def forward(self, input_ids: paddle.Tensor) -> paddle.Tensor:
        x = self.after_embedding(self.embed_tokens(input_ids))  # [b, s, hidden_size]
        for layer in self.layers:
            # Full-block recompute: keep only the block input, rerun the block in backward.
            x = recompute(layer, x) if self.config.recompute and self.training else layer(x)
        return self.after_blocks(x)

    # The two steps outside the blocks are methods so that pipeline stages and sequence parallelism
    # (fleetlm.parallel.plan.GPT_PLAN) run them on their own.

    def after_embedding(self, x: paddle.Tensor) -> paddle.Tensor:
        """Map token embeddings [b, s, embed_dim] to the first block's input [b, s, hidden_size]."""
        if self.project_in is not None:
            x = self.project_in(x)
        if self.embed_positions is not None:
            positions = paddle.arange(x.shape[1]) + self.config.position_offset
            x = x + self.embed_positions(positions)[None]
        if self.embed_layernorm is not None:
            x = self.embed_layernorm(x)
        return F.dropout(x, p=self.dropout, training=self.training)

    def after_blocks(self, x: paddle.Tensor) -> paddle.Tensor:
        """Map the last block's output [b, s, hidden_size] to final hidden states [b, s, embed_dim]."""
        if self.norm is not None:
            x = self.norm(x)
        if self.project_out is not None:
            x = self.project_out(x)
        return x


class GPTForCausalLM(nn.Layer):
    """GPTModel plus the output layer (tied to the token embedding unless tie_word_embeddings is false)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.gpt = GPTModel(config)
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            embed_dim = config.word_embed_proj_dim or config.hidden_size
            self.lm_head = nn.Linear(embed_dim, config.vocab_size, bias_attr=False)
        init_weights(self, config.initializer_range)

    def logits(self, input_ids: paddle.Tensor) -> paddle.Tensor:
        hidden = self.gpt(input_ids)
        if self.lm_head is None:
            return paddle.matmul(hidden, self.gpt.embed_tokens.weight, transpose_y=True)  # [b, s, vocab_size]
        return self.lm_head(hidden)

    def forward(self, input_ids: paddle.Tensor, labels: paddle.Tensor = None) -> paddle.Tensor:
        logits = self.logits(input_ids)
        if labels is None:
            return logits
        return causal_lm_loss(logits, labels)
