"""Pipeline stages cut from a built model: fleet's PipelineLayer over the plan's pieces.

Order of the pipeline: token embedding, the backbone step after it (``plan.after_embedding``:
learned positions, an embedding norm or projection), the decoder blocks, the backbone step after
them (``plan.after_blocks``: final norm, output projection), LM head, loss. Stages are cut at block
boundaries (``seg_method="layer:<block class>"``), so the embedding and its step ride with the first
blocks and the final step and head with the last. Only hidden states [b, s, h] pass between stages;
a family whose blocks need more (GLM's position ids) derives it inside the block. With
``virtual_pp_degree`` > 1 each rank keeps that many non-adjacent chunks and fleet runs the
interleaved 1F1B schedule.

The pieces are the modules of the model built whole on every rank, so each stage starts from the
single-process weights. A tied embedding/head is a ``SharedLayerDesc`` over the token embedding
alone: the first and the last stage each hold a copy of its table, fleet broadcasts the first
stage's copy at start and all-reduces the two gradients after backward. Paddle 3.3.1 never marks the
last stage's copy as the duplicate (it compares ``param.name`` with the attribute name), so its clip
would count the gradient twice; the copy is marked here and ``GlobalNormClip`` skips it.
"""

import paddle
import paddle.nn as nn

from fleetlm.parallel.plan import BackboneStep, ParallelPlan, submodule
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


class BackboneStepLayer(nn.Layer):
    """Layer that owns the submodules of one ``BackboneStep`` of the plan and runs the step."""

    def __init__(self, backbone: nn.Layer, step: BackboneStep):
        super().__init__()
        parts = [submodule(backbone, name) for name in step.modules]
        self.parts = nn.LayerList([part for part in parts if part is not None])
        # A bound method is a plain attribute, so the backbone itself is not registered as a sublayer.
        self._method = getattr(backbone, step.method) if step.method else None

    def forward(self, hidden: paddle.Tensor) -> paddle.Tensor:
        if self._method is not None:
            return self._method(hidden)
        for part in self.parts:
            hidden = part(hidden)
        return hidden


class EmbeddingStage(nn.Layer):
    """Token embedding and the backbone step after it: input_ids [b, s] to the first block's input [b, s, h]."""

    def __init__(self, embedding: nn.Layer, after_embedding: BackboneStepLayer):
        super().__init__()
        self.embedding = embedding
        self.after_embedding = after_embedding

    def forward(self, input_ids: paddle.Tensor) -> paddle.Tensor:
        return self.after_embedding(self.embedding(input_ids))


class FinalStage(nn.Layer):
    """The backbone step after the blocks, then the LM head: [b, s, h] to logits [b, s, vocab (/ tp)]."""

    def __init__(self, after_blocks: BackboneStepLayer, head: nn.Layer = None):
        super().__init__()
        self.after_blocks = after_blocks
        self.head = head

    def forward(self, hidden: paddle.Tensor) -> paddle.Tensor:
        hidden = self.after_blocks(hidden)
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


def _check_pieces_cover_backbone(backbone: nn.Layer, pieces) -> None:
    """Raise ValueError when a backbone parameter belongs to no pipeline piece, because no stage would train it."""
    covered = {id(p) for piece in pieces for p in piece.parameters()}
    missing = [name for name, p in backbone.named_parameters() if id(p) not in covered]
    if missing:
        raise ValueError(
            f"the parallel plan of {type(backbone).__name__} leaves {missing} outside every pipeline piece; "
            "list their submodules in the plan's after_embedding or after_blocks step."
        )


def build_pipeline(model: nn.Layer, plan: ParallelPlan, head, tied_head_factory, loss_fn, hcg, virtual_pp_degree: int):
    """Return a PipelineLayer over ``model``'s pieces; ``head`` is None when the head is tied.

    ``tied_head_factory(weight)`` builds the tied head around the embedding table.
    """
    from paddle.distributed.fleet.meta_parallel import PipelineLayer, SharedLayerDesc

    backbone = submodule(model, plan.backbone)
    embedding = submodule(backbone, plan.embedding)
    blocks = list(submodule(backbone, plan.blocks))
    after_embedding = BackboneStepLayer(backbone, plan.after_embedding)
    after_blocks = BackboneStepLayer(backbone, plan.after_blocks)
    _check_pieces_cover_backbone(backbone, [embedding, after_embedding, *blocks, after_blocks])
    tied = head is None

    if tied:
        layers = [SharedLayerDesc("embed", SharedEmbedding, None, "weight", embedding)]
        if plan.after_embedding.method or plan.after_embedding.modules:
            layers.append(after_embedding)
        layers += blocks
        layers += [
            FinalStage(after_blocks),
            SharedLayerDesc("embed", SharedEmbedding, _TiedHeadCall(tied_head_factory), "weight", embedding),
        ]
    else:
        layers = [EmbeddingStage(embedding, after_embedding), *blocks, FinalStage(after_blocks, head)]

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
