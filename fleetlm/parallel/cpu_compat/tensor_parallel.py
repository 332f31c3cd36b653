"""Tensor-parallel primitives of ``fleet.layers.mpu.mp_ops`` as PyLayers over gloo collectives.

``ColumnParallelLinear``, ``RowParallelLinear``, ``VocabParallelEmbedding`` and ``ParallelCrossEntropy``
call these through ``mp_ops.<name>`` at run time, so replacing the module attributes is enough. The
forward/backward pairs follow Megatron-LM's tensor-parallel design: an identity whose gradient is
all-reduced, an all-reduce whose gradient passes through, an all-gather paired with a split.
Every PyLayer clones its output because a PyLayer that returns its own input is rejected as an
in-place operation on leaf tensors.
"""

import paddle
import paddle.distributed as dist
import paddle.nn.functional as F
from paddle.autograd import PyLayer
from paddle.distributed.communication.reduce import ReduceOp

from fleetlm.parallel.cpu_compat._registry import original, replace


def _resolve_group(group):
    return group if group is not None else dist.collective._get_global_group()


def _all_reduce(tensor: paddle.Tensor, op, group) -> paddle.Tensor:
    dist.stream.all_reduce(tensor, op=op, group=group, sync_op=True, use_calc_stream=False)
    return tensor


def _all_gather_last_axis(tensor: paddle.Tensor, group) -> paddle.Tensor:
    parts: list[paddle.Tensor] = []
    dist.all_gather(parts, tensor, group=group)
    return paddle.concat(parts, axis=-1)


def _own_slice_last_axis(tensor: paddle.Tensor, group) -> paddle.Tensor:
    width = tensor.shape[-1]
    if width % group.nranks != 0:
        raise ValueError(
            f"last dimension {width} is not divisible by the tensor-parallel degree {group.nranks}"
        )
    part = width // group.nranks
    return tensor[..., group.rank * part : (group.rank + 1) * part].clone()


class IdentityAllReduceGrad(PyLayer):
    """Forward: copy of the input. Backward: gradient summed over the group."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        return tensor.clone()

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad.clone(), ReduceOp.SUM, ctx.group)


class AllReduceIdentityGrad(PyLayer):
    """Forward: input summed over the group. Backward: gradient passed through."""

    @staticmethod
    def forward(ctx, tensor, group):
        return _all_reduce(tensor.clone(), ReduceOp.SUM, group)

    @staticmethod
    def backward(ctx, grad):
        return grad


class AllGatherSplitGrad(PyLayer):
    """Forward: shards concatenated along the last axis in rank order. Backward: this rank's slice."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        return _all_gather_last_axis(tensor, group)

    @staticmethod
    def backward(ctx, grad):
        return _own_slice_last_axis(grad, ctx.group)


class SplitAllGatherGrad(PyLayer):
    """Forward: this rank's slice of the last axis. Backward: slices gathered along the last axis."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        return _own_slice_last_axis(tensor, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_last_axis(grad, ctx.group)


def c_identity(tensor, group=None, skip_c_identity_dynamic=False):
    """Replace ``mp_ops._c_identity``, the input of ``ColumnParallelLinear``.

    Why: on CPU the forward raises "Do not support c_identity for cpu kernel now", and the backward
    calls ``all_reduce_on_calc_stream``, which gloo does not implement.
    Semantics: forward returns a copy of ``tensor``; backward sums the gradient over ``group``.
    ``skip_c_identity_dynamic`` only skips a kernel launch in Paddle, so it changes nothing here.
    """
    if not paddle.in_dynamic_mode():
        return original("mp_ops._c_identity")(tensor, group, skip_c_identity_dynamic)
    if group is not None and not group.is_member():
        return None
    return IdentityAllReduceGrad.apply(tensor, _resolve_group(group))


def mp_allreduce(
    tensor,
    op=ReduceOp.SUM,
    group=None,
    use_calc_stream=True,
    use_model_parallel=True,
    skip_c_identity_dynamic=False,
):
    """Replace ``mp_ops._mp_allreduce``, the output of ``RowParallelLinear`` and ``VocabParallelEmbedding``.

    Why: the forward raises "ProcessGroupGLOO does not support all_reduce with sync_op and
    use_calc_stream flag", and the backward runs the ``c_identity`` kernel, which has no CPU version.
    Semantics: forward returns the sum of ``tensor`` over ``group`` (the input is not modified, unlike
    Paddle's in-place version); backward passes the gradient through. Only ``ReduceOp.SUM`` is accepted,
    as in Paddle.
    """
    if not paddle.in_dynamic_mode():
        return original("mp_ops._mp_allreduce")(
            tensor, op, group, use_calc_stream, use_model_parallel, skip_c_identity_dynamic
        )
    if group is not None and not group.is_member():
        return None
    if op != ReduceOp.SUM:
        raise ValueError(f"_mp_allreduce supports only ReduceOp.SUM, got {op}")
    return AllReduceIdentityGrad.apply(tensor, _resolve_group(group))


def c_concat(tensor, group=None):
    """Replace ``mp_ops._c_concat``, the ``gather_output=True`` path of ``ColumnParallelLinear``.

    Why: the CPU ``c_concat`` kernel is a stub: "Do not support c_concat for cpu kernel now".
    Semantics: forward concatenates the shards of all ranks along the last axis in group-rank order;
    backward returns this rank's slice of the gradient.
    """
    if not paddle.in_dynamic_mode():
        return original("mp_ops._c_concat")(tensor, group)
    if group is not None and not group.is_member():
        return None
    return AllGatherSplitGrad.apply(tensor, _resolve_group(group))


def c_split(tensor, group=None):
    """Replace ``mp_ops._c_split``, the ``input_is_parallel=False`` path of ``RowParallelLinear``.

    Why: the CPU ``c_split`` kernel is a stub ("Do not support c_split for cpu kernel now"), and Paddle's
    backward gathers through ``all_gather_into_tensor_on_calc_stream``, which gloo does not implement.
    Semantics: forward keeps this rank's equal slice of the last axis; backward gathers the gradient
    slices along the last axis, the inverse of the forward.
    """
    if not paddle.in_dynamic_mode():
        return original("mp_ops._c_split")(tensor, group)
    if group is not None and not group.is_member():
        return None
    return SplitAllGatherGrad.apply(tensor, _resolve_group(group))


class VocabParallelSoftmaxCrossEntropy(PyLayer):
    """Softmax cross entropy over logits whose vocabulary axis is split across ``group``.

    Forward, per row: ``loss = log(sum_v exp(z_v - m)) - (z_label - m)`` with ``m`` the global max. The
    max, the sum of exponentials and the label's logit are each all-reduced over the shards. Rows
    whose label equals ``ignore_index`` get loss 0.
    Backward: ``dlogits = (softmax - one_hot(label)) * dloss`` on this rank's vocabulary range, and 0 on
    ignored rows.
    """

    @staticmethod
    def forward(ctx, logits, label, group, ignore_index):
        vocab_per_rank = logits.shape[-1]
        vocab_start = group.rank * vocab_per_rank

        max_logit = _all_reduce(logits.max(axis=-1, keepdim=True), ReduceOp.MAX, group)
        shifted = logits - max_logit
        exp_logits = paddle.exp(shifted)
        sum_exp = _all_reduce(exp_logits.sum(axis=-1, keepdim=True), ReduceOp.SUM, group)

        # Only the rank whose vocabulary range contains the label contributes its logit. Others add 0.
        local_label = label - vocab_start
        in_range = paddle.logical_and(local_label >= 0, local_label < vocab_per_rank)
        safe_label = paddle.where(in_range, local_label, paddle.zeros_like(local_label))
        label_logit = paddle.take_along_axis(shifted, safe_label, axis=-1) * in_range.astype(logits.dtype)
        label_logit = _all_reduce(label_logit, ReduceOp.SUM, group)

        not_ignored = (label != ignore_index).astype(logits.dtype)
        loss = (paddle.log(sum_exp) - label_logit) * not_ignored
        softmax = exp_logits / sum_exp

        ctx.save_for_backward(softmax, safe_label, in_range, not_ignored)
        ctx.mark_non_differentiable(softmax)
        return loss, softmax

    @staticmethod
    def backward(ctx, loss_grad, softmax_grad=None):
        softmax, safe_label, in_range, not_ignored = ctx.saved_tensor()
        one_hot = F.one_hot(safe_label.squeeze(-1), softmax.shape[-1]).astype(softmax.dtype)
        one_hot = one_hot * in_range.astype(softmax.dtype)
        return (softmax - one_hot) * (loss_grad * not_ignored), None


def c_softmax_with_cross_entropy(logits, label, group=None, return_softmax=False, ignore_index=-100):
    """Replace ``mp_ops._c_softmax_with_cross_entropy``, the body of ``ParallelCrossEntropy``.

    Why: the CPU kernel is a stub ("Do not support c_softmax_with_cross_entropy for cpu kernel now")
    and no CPU gradient kernel is registered.
    Semantics: see :class:`VocabParallelSoftmaxCrossEntropy`. ``label`` contains global vocabulary ids,
    shaped like ``logits`` without its last axis or with a last axis of 1; the loss has the label's
    shape with a last axis of 1, as Paddle's kernel returns. With ``return_softmax`` the local softmax
    shard comes second.
    """
    if not paddle.in_dynamic_mode():
        return original("mp_ops._c_softmax_with_cross_entropy")(logits, label, group, return_softmax, ignore_index)
    if group is not None and not group.is_member():
        return None
    group = _resolve_group(group)

    if label.ndim == logits.ndim - 1:
        label = label.unsqueeze(-1)
    if label.ndim != logits.ndim or label.shape[-1] != 1:
        raise ValueError(
            f"label must have shape {logits.shape[:-1]} or {logits.shape[:-1] + [1]} for logits of shape "
            f"{logits.shape}, got {label.shape}"
        )
    loss, softmax = VocabParallelSoftmaxCrossEntropy.apply(logits, label, group, ignore_index)
    return (loss, softmax) if return_softmax else loss


def broadcast_input_data(hcg, *inputs, **kwargs):
    """Replace ``hybrid_parallel_util.broadcast_input_data``, called by ``TensorParallel`` before each forward.

    Why: it asserts ``Only support xpu, gpu and custom_device now, but this is cpu``.
    Semantics: as Paddle's, every tensor in ``inputs`` and ``kwargs`` (nested in lists, tuples and dicts)
    is overwritten in place with the copy held by the first rank of the model-parallel group, and other
    objects are broadcast with ``broadcast_object_list``; the inputs are returned.
    """
    from paddle.distributed.fleet.utils import hybrid_parallel_util

    place = paddle.CPUPlace()
    if inputs:
        hybrid_parallel_util._broadcast_nested_data(hcg, "cpu", place, inputs)
    if kwargs:
        hybrid_parallel_util._broadcast_nested_data(hcg, "cpu", place, kwargs)
    return inputs, kwargs


def install() -> list[str]:
    """Install the tensor-parallel replacements and return the names of the replaced Paddle symbols."""
    from paddle.distributed import collective
    from paddle.distributed.fleet.layers.mpu import mp_ops
    from paddle.distributed.fleet.meta_parallel import tensor_parallel
    from paddle.distributed.fleet.utils import hybrid_parallel_util

    replacements = {
        "_c_identity": c_identity,
        "_mp_allreduce": mp_allreduce,
        "_c_concat": c_concat,
        "_c_split": c_split,
        "_c_softmax_with_cross_entropy": c_softmax_with_cross_entropy,
    }
    for attribute, replacement in replacements.items():
        replace(mp_ops, attribute, replacement, f"mp_ops.{attribute}")
        replace(collective, attribute, replacement, f"paddle.distributed.collective.{attribute}")
    replace(
        hybrid_parallel_util,
        "broadcast_input_data",
        broadcast_input_data,
        "hybrid_parallel_util.broadcast_input_data",
    )
    replace(
        tensor_parallel,
        "broadcast_input_data",
        broadcast_input_data,
        "tensor_parallel.broadcast_input_data",
    )
    return [f"mp_ops.{attribute}" for attribute in replacements] + ["TensorParallel input broadcast"]
