"""Tensor and sequence parallelism applied to a built model by swapping the sublayers a plan names.

The model is built whole on every rank from the run's seed, so every rank has the same full
weights as a single-process run. ``apply_tensor_parallel`` then replaces each named projection by
fleet's parallel layer and copies this rank's slice of the full weight into it, which is what
makes a tensor-parallel run start from exactly the single-process initialisation.

Splits (Paddle stores Linear weights as [in_features, out_features]):
    column-parallel  weight [in, out / tp], split_axis 1; bias split the same way
    row-parallel     weight [in / tp, out], split_axis 0; output all-reduced
    vocab-parallel   embedding [vocab / tp, hidden], split_axis 0; the LM head [hidden, vocab / tp]
Sequence parallelism (Korthikanti et al., 2022) keeps activations outside attention and the MLP
split along the sequence: [b, s / tp, h]. Entering a region all-gathers the sequence (backward:
reduce-scatter); leaving it reduce-scatters the row-parallel partial sums (backward: all-gather)
and then adds the row-parallel bias, if any, to this rank's slice. The first block's input is split
and the last block's output gathered, so the backbone steps outside the blocks (final norm, learned
positions, embedding norm) run on the whole sequence with the single-process weights.
Fleet's ``sequence_parallel_utils`` operators split axis 0 of [s, b, h] tensors, so the model's
[b, s, h] activations are transposed around them.
"""

from typing import Optional

import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from paddle.autograd import PyLayer

from fleetlm.parallel.plan import ParallelPlan, replace_submodule, submodule
from fleetlm.utils.log import get_logger

logger = get_logger(__name__)


def _slice(full: paddle.Tensor, axis: int, rank: int, degree: int) -> paddle.Tensor:
    size = full.shape[axis] // degree
    return paddle.slice(full, axes=[axis], starts=[rank * size], ends=[(rank + 1) * size])


def _mark_distributed(parameter, axis: int) -> None:
    parameter.is_distributed = True
    parameter.split_axis = axis


def _copy_into(target, full: paddle.Tensor, axis: Optional[int], rank: int, degree: int) -> None:
    value = full if axis is None else _slice(full, axis, rank, degree)
    with paddle.no_grad():
        target.set_value(value.astype(target.dtype))


def _column_linear(linear: nn.Linear, group, rank: int, degree: int, sequence_parallel: bool):
    """Build the column-parallel copy of ``linear`` that keeps this rank's output features."""
    from paddle.distributed.fleet.meta_parallel import ColumnParallelLinear

    in_features, out_features = linear.weight.shape
    has_bias = linear.bias is not None
    if sequence_parallel:
        # The region's all-gather already supplies the backward reduction that ColumnParallelLinear's
        # identity op would add, so a plain Linear keeps the shard.
        layer = nn.Linear(in_features, out_features // degree, bias_attr=None if has_bias else False)
        _mark_distributed(layer.weight, 1)
        if has_bias:
            _mark_distributed(layer.bias, 0)
    else:
        layer = ColumnParallelLinear(in_features, out_features, has_bias=has_bias, gather_output=False, mp_group=group)
    _copy_into(layer.weight, linear.weight, 1, rank, degree)
    if has_bias:
        _copy_into(layer.bias, linear.bias, 0, rank, degree)
    return layer


def _row_linear(linear: nn.Linear, group, rank: int, degree: int, sequence_parallel: bool):
    """Build the row-parallel copy of ``linear`` that keeps this rank's input features."""
    from paddle.distributed.fleet.meta_parallel import RowParallelLinear

    in_features, out_features = linear.weight.shape
    has_bias = linear.bias is not None
    if sequence_parallel:
        layer = SequenceParallelRowLinear(in_features // degree, out_features, has_bias)
        _mark_distributed(layer.weight, 0)
    else:
        layer = RowParallelLinear(in_features, out_features, has_bias=has_bias, input_is_parallel=True, mp_group=group)
    _copy_into(layer.weight, linear.weight, 0, rank, degree)
    if has_bias:
        _copy_into(layer.bias, linear.bias, None, rank, degree)
    return layer


class SequenceParallelRowLinear(nn.Layer):
    """Row-parallel shard under sequence parallelism: x @ weight, a partial sum over the tensor-parallel ranks.

    ``bias`` is not added here. The region that ends in this projection adds it after its
    reduce-scatter, because adding it to each partial sum would count it tensor_parallel_degree times.
    """

    def __init__(self, in_features: int, out_features: int, has_bias: bool):
        super().__init__()
        self.weight = self.create_parameter([in_features, out_features])
        self.bias = self.create_parameter([out_features], is_bias=True) if has_bias else None

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return paddle.matmul(x, self.weight)


class VocabParallelHead(nn.Layer):
    """LM head over this rank's vocabulary slice: logits [b, s, vocab / tp], from an own or a tied weight.

    Tied (``weight`` is the embedding table [vocab (/ tp), hidden]) the product is taken with the
    table transposed. With a group, the identity op sums the input gradient over the tensor-parallel
    ranks; without one (tp = 1) the head is a plain matmul. ``normalize`` gives Baichuan2's NormHead:
    each vocabulary column of the [hidden, vocab] weight is scaled to unit L2 norm, which a
    column-parallel split keeps whole.
    """

    def __init__(self, weight, transpose: bool, group=None, normalize: bool = False):
        super().__init__()
        self.weight = weight
        self.transpose = transpose
        self.group = group
        self.normalize = normalize

    def forward(self, hidden: paddle.Tensor) -> paddle.Tensor:
        if self.group is not None:
            from paddle.distributed.fleet.layers.mpu import mp_ops

            hidden = mp_ops._c_identity(hidden, group=self.group)
        weight = F.normalize(self.weight, axis=0) if self.normalize else self.weight
        return paddle.matmul(hidden, weight, transpose_y=self.transpose)


class CausalLMLoss(nn.Layer):
    """Mean token cross entropy in fp32; over vocabulary-split logits with ParallelCrossEntropy when tp > 1."""

    def __init__(self, group=None):
        super().__init__()
        self.parallel = None
        if group is not None:
            from paddle.distributed.fleet.meta_parallel import ParallelCrossEntropy

            self.parallel = ParallelCrossEntropy(mp_group=group)

    def forward(self, logits: paddle.Tensor, labels: paddle.Tensor) -> paddle.Tensor:
        logits = logits.astype("float32")
        if self.parallel is not None:
            return self.parallel(logits, labels).mean()
        return F.cross_entropy(logits, labels.unsqueeze(-1), reduction="none").mean()


# ----------------------------------------------------------------- sequence parallel


class _ContiguousGradient(PyLayer):
    """Identity whose backward makes the gradient contiguous: gloo collectives reject strided tensors."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def _sequence_first(op, x: paddle.Tensor) -> paddle.Tensor:
    # [b, s, h] -> [s, b, h] for fleet's operator, then back.
    out = op.apply(x.transpose([1, 0, 2]).contiguous())
    return _ContiguousGradient.apply(out).transpose([1, 0, 2]).contiguous()


def scatter_sequence(x: paddle.Tensor) -> paddle.Tensor:
    """Keep this rank's slice of the sequence axis of [b, s, h]; backward all-gathers."""
    from paddle.distributed.fleet.utils import sequence_parallel_utils as spu

    return _sequence_first(spu.ScatterOp, x)


def gather_sequence(x: paddle.Tensor) -> paddle.Tensor:
    """All-gather the sequence axis of [b, s / tp, h]; backward keeps this rank's slice."""
    from paddle.distributed.fleet.utils import sequence_parallel_utils as spu

    return _sequence_first(spu.GatherOp, x)


def _enter_region(x: paddle.Tensor) -> paddle.Tensor:
    from paddle.distributed.fleet.utils import sequence_parallel_utils as spu

    return _sequence_first(spu.AllGatherOp, x)


def _leave_region(x: paddle.Tensor) -> paddle.Tensor:
    from paddle.distributed.fleet.utils import sequence_parallel_utils as spu

    return _sequence_first(spu.ReduceScatterOp, x)


def _leave_region_then_add(bias: Optional[paddle.Tensor]):
    """Return the region exit: reduce-scatter the partial sums, then add the row-parallel ``bias``."""

    def leave(x: paddle.Tensor) -> paddle.Tensor:
        x = _leave_region(x)
        return x if bias is None else x + bias

    return leave


def _wrap_forward(module: nn.Layer, before=None, after=None) -> None:
    """Run ``before`` on the input and ``after`` on the output of ``module`` without renaming its parameters."""
    inner = module.forward

    def forward(x, *args, **kwargs):
        if before is not None:
            x = before(x)
        out = inner(x, *args, **kwargs)
        return after(out) if after is not None else out

    module.forward = forward


def sequence_parallel_parameters(model: nn.Layer):
    """Parameters whose gradients are partial sums over the sequence slices and need an all-reduce."""
    return [p for p in model.parameters() if getattr(p, "sequence_parallel", False)]


# ----------------------------------------------------------------- the swap


def normalized_head(model: nn.Layer) -> bool:
    """Return True when the model normalises its LM head's vocabulary columns (Baichuan2's NormHead)."""
    return bool(getattr(getattr(model, "config", None), "norm_head", False))


def apply_tensor_parallel(model: nn.Layer, plan: ParallelPlan, hcg, sequence_parallel: bool) -> nn.Layer:
    """Swap the plan's sublayers of ``model`` for this rank's tensor-parallel shards; return the LM head.

    The returned head maps final hidden states to this rank's vocabulary slice of the logits; pair
    it with ``CausalLMLoss(group)``. Parameters keep their structured names.
    """
    from paddle.distributed.fleet.meta_parallel import VocabParallelEmbedding
    from paddle.distributed.fleet.utils import sequence_parallel_utils as spu

    group = hcg.get_model_parallel_group()
    rank = hcg.get_model_parallel_rank()
    degree = hcg.get_model_parallel_world_size()
    backbone = submodule(model, plan.backbone)

    embedding = submodule(backbone, plan.embedding)
    vocab_size, hidden_size = embedding.weight.shape
    parallel_embedding = VocabParallelEmbedding(vocab_size, hidden_size, mp_group=group)
    _copy_into(parallel_embedding.weight, embedding.weight, 0, rank, degree)
    replace_submodule(backbone, plan.embedding, parallel_embedding)

    for block in submodule(backbone, plan.blocks):
        attention = submodule(block, plan.attention)
        if hasattr(attention, "keep_head_slice"):
            attention.keep_head_slice(rank, degree)  # ALiBi: this rank's heads keep their own slopes
        for path in plan.column_parallel:
            replace_submodule(block, path, _column_linear(submodule(block, path), group, rank, degree, sequence_parallel))
        for path in plan.row_parallel:
            replace_submodule(block, path, _row_linear(submodule(block, path), group, rank, degree, sequence_parallel))
        if sequence_parallel:
            for region in plan.sequence_parallel_regions:
                (row_path,) = [path for path in plan.row_parallel if path.startswith(region + ".")]
                bias = submodule(block, row_path).bias
                _wrap_forward(submodule(block, region), before=_enter_region, after=_leave_region_then_add(bias))

    if plan.lm_head is not None and getattr(model, plan.lm_head, None) is not None:
        full_head = getattr(model, plan.lm_head)
        head = VocabParallelHead(
            model.create_parameter(
                [hidden_size, vocab_size // degree], dtype=full_head.weight.dtype, is_bias=False
            ),
            transpose=False,
            group=group,
            normalize=normalized_head(model),
        )
        _mark_distributed(head.weight, 1)
        _copy_into(head.weight, full_head.weight, 1, rank, degree)
        setattr(model, plan.lm_head, head)
    else:
        head = VocabParallelHead(parallel_embedding.weight, transpose=True, group=group)

    if sequence_parallel:
        blocks = submodule(backbone, plan.blocks)
        _wrap_forward(blocks[0], before=scatter_sequence)
        _wrap_forward(blocks[len(blocks) - 1], after=gather_sequence)
        # Norms and row-parallel biases inside the blocks see this rank's slice of the sequence, so
        # their gradients are partial sums; parameters outside the blocks see the whole sequence.
        for parameter in blocks.parameters():
            if not getattr(parameter, "is_distributed", False):
                spu.mark_as_sequence_parallel_parameter(parameter)
    return head
