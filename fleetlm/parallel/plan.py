"""Parallel plans: where each model family keeps the pieces that tensor and pipeline parallelism split.

A plan names submodules; it contains no code. ``fleetlm.parallel.tensor_parallel`` swaps the named
projections for fleet's parallel layers, ``fleetlm.parallel.pipeline`` cuts the named pieces into
stages, and ``fleetlm.parallel.recompute`` wraps the named blocks. A family whose modules follow
the LLaMA names (q_proj ... down_proj, embed_tokens, norm, lm_head) reuses ``LLAMA_PLAN`` as is.
"""

from dataclasses import dataclass, replace
from typing import Dict, Optional, Tuple


@dataclass(frozen=True)
class ParallelPlan:
    """Submodule names of one causal-LM family, relative to the model or to one decoder block."""

    backbone: str  # the module that maps input_ids [b, s] to final hidden states [b, s, hidden_size]
    embedding: str  # token embedding inside the backbone: vocab-parallel
    blocks: str  # the LayerList of decoder blocks inside the backbone
    final_norm: str  # norm after the last block, inside the backbone
    lm_head: Optional[str]  # output projection on the model; None when tied to the embedding
    # Inside a decoder block: column-parallel projections split their output features, row-parallel
    # ones their input features, so each column -> row pair needs one all-reduce (Megatron-LM's split).
    column_parallel: Tuple[str, ...]
    row_parallel: Tuple[str, ...]
    # The two halves of a block that sequence parallelism runs on the full sequence; everything else
    # in the block (norms, residual adds) runs on this rank's slice of the sequence.
    sequence_parallel_regions: Tuple[str, ...]
    attention: str  # the attention module of a block; its ``core_attention`` method is softmax(QK^T)V
    # True when the backbone's forward is exactly embedding -> blocks(hidden) -> final norm, so that
    # pipeline stages and the sequence-parallel split after the embedding reproduce it. False for
    # backbones that add position embeddings after the lookup or pass position ids to their blocks.
    plain_backbone: bool = True


LLAMA_PLAN = ParallelPlan(
    backbone="llama",
    embedding="embed_tokens",
    blocks="layers",
    final_norm="norm",
    lm_head="lm_head",
    column_parallel=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"),
    row_parallel=("self_attn.o_proj", "mlp.down_proj"),
    sequence_parallel_regions=("self_attn", "mlp"),
    attention="self_attn",
)

# GPT-2/GPT-3, OPT and BLOOM (fleetlm/models/gpt.py): two-layer MLP without a gate projection.
GPT_PLAN = replace(LLAMA_PLAN, backbone="gpt", column_parallel=LLAMA_PLAN.column_parallel[:3] + ("mlp.up_proj",),
                   plain_backbone=False)
# ChatGLM-6B (two-layer MLP) and GLM-130B (GeGLU with gate_proj) in fleetlm/models/chatglm.py.
CHATGLM_PLAN = replace(GPT_PLAN, backbone="glm")
GLM_PLAN = replace(LLAMA_PLAN, backbone="glm", plain_backbone=False)

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
