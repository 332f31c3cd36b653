"""LLaMA and LLaMA-2 (Touvron et al., 2023): pre-norm decoder with RMSNorm, rotary, SwiGLU, GQA.

The LLaMA-like families are config switches on this file (see fleetlm.models.registry).
Baichuan-7B is LLaMA, and Baichuan-13B replaces rotary by ALiBi. Baichuan2 adds NormHead, an output
layer whose per-token weight vectors are L2-normalised. Qwen v1 adds a bias to the q/k/v projections.
ChatGLM2 has that bias too, two key/value groups, and interleaved rotary on half of each head.

Parameter names match PaddleNLP's LlamaForCausalLM one to one (``llama.layers.0.self_attn.q_proj.weight``)
and Hugging Face's after replacing the ``llama.`` prefix by ``model.``; Paddle stores Linear weights as
[in_features, out_features], the transpose of Hugging Face's layout (see fleetlm.models.weights).

The model has no parallel branches: tensor and pipeline parallelism replace or regroup its
sublayers from outside, by name.
"""

import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from paddle.distributed.fleet.utils import recompute

from fleetlm.models.config import ModelConfig
from fleetlm.models.layers import RotaryEmbedding, SelfAttention, build_mlp, build_norm


class LlamaDecoderLayer(nn.Layer):
    """x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = build_norm(config)
        alibi = config.position_embedding_type == "alibi"
        rotary = None
        if not alibi:
            rotary = RotaryEmbedding(
                config.head_dim, config.rope_theta, config.use_fused_rope, config.rotary_dim, config.rope_interleaved
            )
        self.self_attn = SelfAttention(
            config.hidden_size,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
            rotary,
            bias=config.attention_bias,
            use_flash_attention=config.use_flash_attention,
            attention_dropout=config.attention_probs_dropout_prob,
            out_bias=config.attention_out_bias,
            alibi=alibi,
        )
        self.post_attention_layernorm = build_norm(config)
        self.mlp = build_mlp(config)
        self.dropout = config.hidden_dropout_prob

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        h = self.self_attn(self.input_layernorm(x))
        x = x + F.dropout(h, p=self.dropout, training=self.training)
        h = self.mlp(self.post_attention_layernorm(x))
        return x + F.dropout(h, p=self.dropout, training=self.training)


class LlamaModel(nn.Layer):
    """Token embedding, the decoder blocks and the final norm; returns hidden states [b, s, hidden_size]."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.LayerList([LlamaDecoderLayer(config) for _ in range(config.num_hidden_layers)])
        self.norm = build_norm(config)

    def forward(self, input_ids: paddle.Tensor) -> paddle.Tensor:
        x = self.embed_tokens(input_ids)  # [b, s, hidden_size]
        for layer in self.layers:
            if self.config.recompute and self.training:
                # Full-block recompute: keep only the block input, rerun the block in backward.
                x = recompute(layer, x)
            else:
                x = layer(x)
        return self.norm(x)


class NormHead(nn.Linear):
    """Baichuan2's output layer: logits = hidden @ W with each vocabulary entry's weight vector L2-normalised.

    The vectors are the columns of Paddle's [hidden, vocab] weight, normalised again at every call so
    that the gradient flows through the normalisation. A column-parallel split keeps columns whole.
    """

    def forward(self, hidden: paddle.Tensor) -> paddle.Tensor:
        return paddle.matmul(hidden, F.normalize(self.weight, axis=0))  # [b, s, vocab_size]


class LlamaForCausalLM(nn.Layer):
    """LlamaModel plus the output layer; ``forward(input_ids, labels)`` returns the mean token loss."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.llama = LlamaModel(config)
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            head_class = NormHead if config.norm_head else nn.Linear
            self.lm_head = head_class(config.hidden_size, config.vocab_size, bias_attr=False)
        init_weights(self, config.initializer_range)

    def logits(self, input_ids: paddle.Tensor) -> paddle.Tensor:
        hidden = self.llama(input_ids)
        if self.lm_head is None:
            # Tied: the [vocab, hidden] embedding table is the output projection, transposed.
            return paddle.matmul(hidden, self.llama.embed_tokens.weight, transpose_y=True)
        return self.lm_head(hidden)  # [b, s, vocab_size]

    def forward(self, input_ids: paddle.Tensor, labels: paddle.Tensor = None) -> paddle.Tensor:
        logits = self.logits(input_ids)
        if labels is None:
            return logits
        return causal_lm_loss(logits, labels)


def causal_lm_loss(logits: paddle.Tensor, labels: paddle.Tensor) -> paddle.Tensor:
    """Mean cross entropy over every token of logits [b, s, vocab] against labels [b, s], in fp32."""
    loss = F.cross_entropy(logits.astype("float32"), labels.unsqueeze(-1), reduction="none")
    return loss.mean()


def init_weights(model: nn.Layer, std: float) -> None:
    """Normal(0, std) for Linear and Embedding weights, zeros for biases; norms keep their ones.

    Draws come from Paddle's global generator in parameter order, so a seed fixes the weights.
    """
    normal = nn.initializer.Normal(mean=0.0, std=std)
    zeros = nn.initializer.Constant(0.0)
    for layer in model.sublayers():
        if isinstance(layer, (nn.Linear, nn.Embedding)):
            normal(layer.weight)
            if getattr(layer, "bias", None) is not None:
                zeros(layer.bias)
