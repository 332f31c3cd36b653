"""Pipeline stages cut from a built model: fleet's PipelineLayer over the plan's pieces.

Order of the pipeline: embedding, the decoder blocks, final norm, LM head, loss. Stages are cut at
block boundaries (``seg_method="layer:<block class>"``), so the embedding rides with the first
blocks and the head with the last. With ``virtual_pp_degree`` > 1 each rank keeps that many
non-adjacent chunks and fleet runs the interleaved 1F1B schedule.

The pieces are the modules of the model built whole on every rank, so each stage starts from the
single-process weights. A tied embedding/head is a ``SharedLayerDesc``: the first and the last stage
each hold a copy, fleet broadcasts the first stage's copy at start and all-reduces the two gradients
after backward. Paddle 3.3.1 never marks the last stage's copy as the duplicate (it compares
``param.name`` with the attribute name), so its clip would count the gradient twice; the copy is
marked here and ``GlobalNormClip`` skips it.
"""

import paddle
import paddle.nn as nn

from fleetlm.parallel.plan import ParallelPlan, submodule
from fleetlm.utils.log import get_logger

logger = get_logger(__name__)


class SharedEmbedding(nn.Layer):
    """Holder of the embedding for ``SharedLayerDesc``: exposes its table as ``weight``."""

    def __init__(self, embedding: nn.Layer):
        super().__init__()
        self.embedding = embedding
        self.weight = embedding.weight

    def forward(self, input_ids: paddle.Tensor) -> paddle.Tensor:
        return self.embedding(input_ids)


class FinalStage(nn.Layer):
    """Final norm followed by the LM head: hidden states [b, s, h] to logits [b, s, vocab (/ tp)]."""

    def __init__(self, norm: nn.Layer, head: nn.Layer = None):
        super().__init__()
        self.norm = norm
        self.head = head

    def forward(self, hidden: paddle.Tensor) -> paddle.Tensor:
        hidden = self.norm(hidden)
        return self.head(hidden) if self.head is not None else hidden


class _TiedHeadCall:
    """``forward_func`` of the tied head: builds the head around the shared table on first use."""

    def __init__(self, head_factory):
        self.head_factory = head_factory
        self.head = None

    def __call__(self, shared: SharedEmbedding, hidden: paddle.Tensor) -> paddle.Tensor:
        if self.head is None:
            self.head = self.head_factory(shared.weight)
        return self.head(hidden)


def build_pipeline(model: nn.Layer, plan: ParallelPlan, head, tied_head_factory, loss_fn, hcg, virtual_pp_degree: int):
    """Return a PipelineLayer over ``model``'s pieces; ``head`` is None when the head is tied.

    ``tied_head_factory(weight)`` builds the tied head around the embedding table.
    """
    from paddle.distributed.fleet.meta_parallel import PipelineLayer, SharedLayerDesc

    backbone = submodule(model, plan.backbone)
    embedding = submodule(backbone, plan.embedding)
    blocks = list(submodule(backbone, plan.blocks))
    norm = submodule(backbone, plan.final_norm)
    tied = head is None

    if tied:
        layers = [SharedLayerDesc("embed", SharedEmbedding, None, "weight", embedding)]
        layers += blocks
        layers += [
            FinalStage(norm),
            SharedLayerDesc("embed", SharedEmbedding, _TiedHeadCall(tied_head_factory), "weight", embedding),
        ]
    else:
        layers = [embedding, *blocks, FinalStage(norm, head)]

    rng_state = paddle.get_rng_state()
    pipe = PipelineLayer(
        layers=layers,
        num_stages=hcg.get_pipe_parallel_world_size(),
        topology=hcg.topology(),
        loss_fn=loss_fn,
        seg_method=f"layer:{type(blocks[0]).__name__}",
        num_virtual_pipeline_stages=virtual_pp_degree if virtual_pp_degree > 1 else None,
    )
    # PipelineLayer reseeds the global generator per layer while building; restore the run's stream.
    paddle.set_rng_state(rng_state)

    for comm in pipe.shared_comm.values():
        if pipe.global_rank != min(comm["ranks"]):
            for attr in comm["weight_attr"]:
                getattr(comm["layer"], attr).is_firstly_shared = False
    logger.info(
        "pipeline: %d blocks over %d stages x %d virtual chunks, tied head %s; this stage has %d parameters",
        len(blocks), hcg.get_pipe_parallel_world_size(), virtual_pp_degree, tied,
        sum(int(p.numel()) for p in pipe.parameters()),
    )
    return pipe
