"""Parallel plans: where each model family keeps the pieces that tensor and pipeline parallelism split.

A plan names submodules and backbone methods; it contains no code. ``fleetlm.parallel.tensor_parallel``
swaps the named projections for fleet's parallel layers, ``fleetlm.parallel.pipeline`` cuts the named
pieces into stages, and ``fleetlm.parallel.recompute`` wraps the named blocks. A family whose modules
follow the LLaMA names (q_proj ... down_proj, embed_tokens, norm, lm_head) reuses ``LLAMA_PLAN`` as is.

Every backbone is read as four pieces in order: the token embedding, the step after it (learned
positions, an embedding norm or projection; nothing for LLaMA), the decoder blocks, and the step
after them (final norm, output projection). The first pipeline stage runs the first two pieces, the
last stage the last one, and sequence parallelism splits the sequence between the first block's
input and the last block's output, so the steps outside the blocks see whole sequences.
"""

from dataclasses import dataclass, field, replace
from typing import Dict, Optional, Tuple


@dataclass(frozen=True)
class BackboneStep:
    """A part of the backbone outside the decoder blocks, [b, s, width] -> [b, s, width'].

    With ``method`` the backbone's method of that name runs the step. Without it the submodules in
    ``modules`` run in order (an attribute that is None is skipped). ``modules`` lists every
    submodule the step uses either way, because a pipeline stage owns exactly those parameters.
    """

    modules: Tuple[str, ...] = ()
    method: Optional[str] = None


@dataclass(frozen=True)
class ParallelPlan:
    """Submodule names of one causal-LM family, relative to the model or to one decoder block."""

    backbone: str  # the module that maps input_ids [b, s] to final hidden states [b, s, hidden_size]
    embedding: str  # token embedding inside the backbone: vocab-parallel, shared with a tied head
    blocks: str  # the LayerList of decoder blocks inside the backbone; each block maps [b, s, h] to [b, s, h]
    lm_head: Optional[str]  # output projection on the model; None when tied to the embedding
    # Inside a decoder block: column-parallel projections split their output features, row-parallel
    # ones their input features, so each column -> row pair needs one all-reduce (Megatron-LM's split).
    column_parallel: Tuple[str, ...]
    row_parallel: Tuple[str, ...]
    # The two halves of a block that sequence parallelism runs on the full sequence; everything else
    # in the block (norms, residual adds) runs on this rank's slice of the sequence. Each region ends
    # in one of the row-parallel projections.
    sequence_parallel_regions: Tuple[str, ...]
    attention: str  # the attention module of a block; its ``core_attention`` method is softmax(QK^T)V
    # Backbone steps between the token embedding and the first block, and after the last block.
    after_embedding: BackboneStep = field(default_factory=BackboneStep)
    after_blocks: BackboneStep = field(default_factory=lambda: BackboneStep(("norm",)))


LLAMA_PLAN = ParallelPlan(
    backbone="llama",
    embedding="embed_tokens",
    blocks="layers",
    lm_head="lm_head",
    column_parallel=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"),
    row_parallel=("self_attn.o_proj", "mlp.down_proj"),
    sequence_parallel_regions=("self_attn", "mlp"),
    attention="self_attn",
)

# GPT-2/GPT-3, OPT and BLOOM (fleetlm/models/gpt.py): two-layer MLP without a gate projection;
# learned positions, OPT-350m's projections and BLOOM's embedding LayerNorm live in the backbone steps.
GPT_PLAN = replace(
    LLAMA_PLAN,
    backbone="gpt",
    column_parallel=LLAMA_PLAN.column_parallel[:3] + ("mlp.up_proj",),
    after_embedding=BackboneStep(("project_in", "embed_positions", "embed_layernorm"), "after_embedding"),
    after_blocks=BackboneStep(("norm", "project_out"), "after_blocks"),
)
# ChatGLM-6B (two-layer MLP) and GLM-130B (GeGLU with gate_proj) in fleetlm/models/chatglm.py. Their
# blocks take position ids. A block called with the hidden states alone, as pipeline stages call it,
# uses the positions of a batch with no prefix, which is what pretraining runs.
CHATGLM_PLAN = replace(LLAMA_PLAN, backbone="glm", column_parallel=GPT_PLAN.column_parallel)
GLM_PLAN = replace(LLAMA_PLAN, backbone="glm")

PLANS: Dict[str, ParallelPlan] = {"llama": LLAMA_PLAN, "gpt": GPT_PLAN, "opt": GPT_PLAN, "bloom": GPT_PLAN,
                                  "chatglm": CHATGLM_PLAN, "glm": GLM_PLAN}


def plan_for(model_type: str) -> ParallelPlan:
    """Return the plan of ``model_type``; families without their own entry use LLaMA's names."""
    return PLANS.get(model_type, LLAMA_PLAN)


def submodule(root, path: str):
    """Return the submodule at dotted ``path`` below ``root`` (``"self_attn.q_proj"``)."""
    module = root
    for part in path.split("."):
        module = getattr(module, part)
    return module


def replace_submodule(root, path: str, new) -> None:
    """Put ``new`` at dotted ``path`` below ``root``, under the same attribute name."""
    parent_path, _, name = path.rpartition(".")
    parent = submodule(root, parent_path) if parent_path else root
    setattr(parent, name, new)
