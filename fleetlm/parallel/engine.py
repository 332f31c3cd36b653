"""Turn a model built whole on every rank into the parallel engine of its layout.

Order of the steps, each one from outside the model code:
    1. tensor (and sequence) parallel: swap the plan's projections for fleet's parallel layers
    2. recompute: wrap blocks, attention modules or core attention at the requested granularity
    3. pipeline: cut the pieces into a PipelineLayer (pp > 1), or put head and loss behind the backbone
    4. optimizer: AdamW over this rank's parameters, clipped by ``GlobalNormClip``
    5. wrap: ``group_sharded_parallel`` for sharding stages 2 and 3, else ``fleet.distributed_model``
       and ``fleet.distributed_optimizer`` (data, tensor and pipeline parallel, sharding stage 1)

Every parameter keeps a canonical name: its structured name in the single-process model. A
parameter that tensor parallelism cut also records its split axis. Checkpoints are written and
resharded by name and axis.

NOTE: building the whole model on every rank costs one full copy of the weights per process
until the unused pieces are dropped. That is fine at the sizes trained on CPU. A multi-billion
parameter model on GPUs would need meta-device construction, which this does not do.
"""

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import paddle
import paddle.distributed as dist
import paddle.nn as nn

from fleetlm.parallel.clip import GlobalNormClip
from fleetlm.parallel.plan import ParallelPlan, plan_for, submodule
from fleetlm.parallel.recompute import apply_recompute
from fleetlm.parallel.tensor_parallel import (
    CausalLMLoss,
    VocabParallelHead,
    apply_tensor_parallel,
    normalized_head,
    sequence_parallel_parameters,
)
from fleetlm.utils.log import get_logger

logger = get_logger(__name__)

SHARDING_LEVELS = {"stage2": "os_g", "stage3": "p_g_os"}


@dataclass
class ParallelOptions:
    """The parallel and memory options of a run, as the arguments give them."""

    sharding: str = ""  # "", "stage1", "stage2" or "stage3"
    sequence_parallel: bool = False
    virtual_pp_degree: int = 1
    recompute: bool = False
    recompute_granularity: str = "full"
    no_recompute_layers: Optional[List[int]] = None
    stage3_segment_size: int = 2**20  # stage 3 leaves parameters with fewer elements unsliced


@dataclass
class ShardedParameter:
    """A parameter of this rank under its single-process name; ``split_axis`` None when not split."""

    parameter: paddle.Tensor
    split_axis: Optional[int]


class CausalLMBody(nn.Layer):
    """Backbone, LM head and loss of a model whose head or loss tensor parallelism has replaced."""

    def __init__(self, model: nn.Layer, plan: ParallelPlan, head: nn.Layer, loss: nn.Layer):
        super().__init__()
        self.model = model
        self.head = head
        self.loss = loss
        self._backbone_path = plan.backbone

    def forward(self, input_ids: paddle.Tensor, labels: paddle.Tensor) -> paddle.Tensor:
        hidden = submodule(self.model, self._backbone_path)(input_ids)  # [b, s, hidden_size]
        return self.loss(self.head(hidden), labels)


@dataclass
class ParallelModel:
    """The wrapped engine that the trainer drives, with its optimizer, clip and named parameters."""

    module: nn.Layer  # the layer whose parameters this rank updates
    engine: object  # what training calls: fleet's or group-sharded wrapper, or ``module`` itself
    optimizer: object
    inner_optimizer: paddle.optimizer.Optimizer  # the AdamW that contains this rank's moments
    clip: GlobalNormClip
    parameters: Dict[str, ShardedParameter]  # canonical name -> this rank's tensor (duplicates left out)
    is_pipeline: bool
    sharding_stage: int
    sequence_parallel_parameters: List[paddle.Tensor] = field(default_factory=list)
    model_parallel_group: object = None

    def sync_sequence_parallel_gradients(self) -> None:
        """Sum the partial gradients of norm weights over the sequence slices (before clipping)."""
        for parameter in self.sequence_parallel_parameters:
            if parameter.grad is not None:
                dist.all_reduce(parameter.grad, group=self.model_parallel_group)


def _innermost(optimizer):
    while True:
        inner = getattr(optimizer, "_inner_opt", None) or getattr(optimizer, "_optim", None)
        if inner is None or inner is optimizer:
            return optimizer
        optimizer = inner


def _exchange_shapes_around_eval(engine) -> None:
    """Make the pipeline engine's ``eval_batch`` send its own activation shapes between stages.

    Paddle 3.3.1's pipeline engine sends the shape of the activations to the next stage once and
    then reuses it for every later pass (``P2pHelper`` in pp_utils/p2p_communication.py, with the
    default ``p2p_cache_shape``). An eval micro-batch larger than the training one would therefore
    overrun the receiving stage's buffer. Clearing the cached shapes before and after each eval pass
    makes every stage exchange them again: the eval shapes for the pass, the training shapes after
    it. Every stage evaluates at the same step, so senders and receivers clear their caches together.
    """
    eval_batch = engine.eval_batch

    def eval_batch_with_own_shapes(*args, **kwargs):
        engine._p2p_helper.clear_meta_cache()
        try:
            return eval_batch(*args, **kwargs)
        finally:
            engine._p2p_helper.clear_meta_cache()

    engine.eval_batch = eval_batch_with_own_shapes


def parallelize(
    model: nn.Layer,
    model_type: str,
    topology,
    options: ParallelOptions,
    make_optimizer: Callable[[List[paddle.Tensor], Callable[[str], bool], GlobalNormClip], paddle.optimizer.Optimizer],
    max_grad_norm: float,
    decorate: Optional[Callable] = None,
) -> ParallelModel:
    """Apply the layout of ``topology`` to ``model`` and return the engine to train it with.

    ``decorate(module, optimizer)`` runs before fleet wraps them and returns both (AMP O2 casting).
    """
    plan = plan_for(model_type)
    layout, hcg = topology.layout, topology.hcg
    tp, pp = layout.tp_degree, layout.pp_degree

    # 1. Tensor and sequence parallel.
    group = hcg.get_model_parallel_group() if tp > 1 else None
    if tp > 1:
        head = apply_tensor_parallel(model, plan, hcg, options.sequence_parallel)
        tied = plan.lm_head is None or not isinstance(getattr(model, plan.lm_head, None), VocabParallelHead)

        def tied_head_factory(weight):
            return VocabParallelHead(weight, transpose=True, group=group)
    else:
        full_head = getattr(model, plan.lm_head, None) if plan.lm_head else None
        tied = full_head is None
        embedding_weight = submodule(submodule(model, plan.backbone), plan.embedding).weight
        if tied:
            head = VocabParallelHead(embedding_weight, transpose=True)
        else:
            head = VocabParallelHead(full_head.weight, transpose=False, normalize=normalized_head(model))

        def tied_head_factory(weight):
            return VocabParallelHead(weight, transpose=True)
    loss = CausalLMLoss(group)

    # 2. Recompute.
    if options.recompute:
        apply_recompute(model, plan, options.recompute_granularity, options.no_recompute_layers)

    canonical = {id(p): name for name, p in model.named_parameters()}
    decay = {p.name for name, p in model.named_parameters() if len(p.shape) > 1 and "norm" not in name}

    # 3. Pipeline stages, or the body behind the backbone.
    if pp > 1:
        from fleetlm.parallel.pipeline import build_pipeline

        module = build_pipeline(
            model, plan, None if tied else head, tied_head_factory, loss, hcg, options.virtual_pp_degree
        )
    elif tp > 1:
        module = CausalLMBody(model, plan, head, loss)
    else:
        module = model

    # 4. Optimizer and clip. Stage 3 hands the optimizer slices named "slice@<parameter name>".
    clip = GlobalNormClip(max_grad_norm, hcg)
    optimizer = make_optimizer(module.parameters(), lambda name: name.replace("slice@", "", 1) in decay, clip)
    if decorate is not None:
        module, optimizer = decorate(module, optimizer)

    # 5. Wrap.
    # A sharding stage over a single sharding rank (one process, or sharding_parallel_degree 1) is a no-op.
    sharding_stage = int(options.sharding[-1]) if options.sharding and layout.sharding_degree > 1 else 0
    if sharding_stage in (2, 3):
        from paddle.distributed.sharding import group_sharded_parallel

        dp_group = hcg.get_data_parallel_group() if layout.dp_degree > 1 else None
        engine, optimizer, _ = group_sharded_parallel(
            module, optimizer, SHARDING_LEVELS[options.sharding], group=hcg.get_sharding_parallel_group(),
            segment_size=options.stage3_segment_size, dp_group=dp_group,
        )
    elif topology.is_distributed:
        from paddle.distributed import fleet

        engine = fleet.distributed_model(module)
        optimizer = fleet.distributed_optimizer(optimizer)
        if pp > 1:
            _exchange_shapes_around_eval(engine)
    else:
        engine = module

    parameters = {}
    for p in module.parameters():
        if getattr(p, "is_firstly_shared", True) is False:
            continue
        name = canonical[id(p)]
        axis = getattr(p, "split_axis", None) if getattr(p, "is_distributed", False) else None
        parameters[name] = ShardedParameter(p, axis)
    return ParallelModel(
        module=module,
        engine=engine,
        optimizer=optimizer,
        inner_optimizer=_innermost(optimizer),
        clip=clip,
        parameters=parameters,
        is_pipeline=pp > 1,
        sharding_stage=sharding_stage,
        sequence_parallel_parameters=sequence_parallel_parameters(module) if options.sequence_parallel else [],
        model_parallel_group=group,
    )
