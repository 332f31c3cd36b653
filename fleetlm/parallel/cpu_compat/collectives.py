"""Collectives that gloo lacks, rebuilt from the ones it has: all_reduce AVG, reduce_scatter, new_group.

Each replacement keeps the signature of the Paddle function it replaces, so Paddle's own callers
(fleet, sharding, ``sequence_parallel_utils``) reach it without change.
"""

import importlib

import paddle
import paddle.distributed as dist
from paddle.distributed.communication import stream
from paddle.distributed.communication.reduce import ReduceOp

from fleetlm.parallel.cpu_compat._registry import original, replace


class CompletedTask:
    """Task handle for a collective that already finished, so ``task.wait()`` after ``sync_op=False`` works."""

    def wait(self, timeout=None) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


def _resolve_group(group):
    return group if group is not None else dist.collective._get_global_group()


@paddle.no_grad()
def all_reduce_in_place(tensor: paddle.Tensor, op, group) -> None:
    """Reduce ``tensor`` in place over ``group`` with SUM, MAX, MIN, PROD or AVG, synchronously.

    AVG is SUM followed by a division by the group size. float16 is reduced in float32 because gloo
    adds float16 wrongly (1 + 2 gives inf with Paddle 3.3.1).
    """
    work = tensor.astype(paddle.float32) if tensor.dtype == paddle.float16 else tensor
    reduce_op = ReduceOp.SUM if op == ReduceOp.AVG else op
    stream.all_reduce(work, op=reduce_op, group=group, sync_op=True, use_calc_stream=False)
    if op == ReduceOp.AVG:
        work.scale_(1.0 / group.nranks)
    if work is not tensor:
        paddle.assign(work.astype(tensor.dtype), output=tensor)


def all_reduce(tensor, op=ReduceOp.SUM, group=None, sync_op=True):
    """Replace ``paddle.distributed.all_reduce`` so that ``op=ReduceOp.AVG`` works on CPU.

    Why: Paddle 3.3.1 checks ``paddle.base.core.nccl_version()`` before an AVG reduce, and CPU builds
    have no such function (``AttributeError: module 'paddle.base.libpaddle' has no attribute
    'nccl_version'``). Sharding's fused gradient buffers reduce with AVG.
    Semantics: AVG is a synchronous SUM divided by the group size; every other op goes to Paddle's
    ``all_reduce`` unchanged. Not differentiable, like the original.
    """
    if op != ReduceOp.AVG:
        return original("paddle.distributed.all_reduce")(tensor, op=op, group=group, sync_op=sync_op)
    if group is not None and not group.is_member():
        return None
    all_reduce_in_place(tensor, op, _resolve_group(group))
    return CompletedTask()


def reduce_scatter(tensor, tensor_list, op=ReduceOp.SUM, group=None, sync_op=True):
    """Replace ``paddle.distributed.reduce_scatter``, whose AVG check fails on CPU like ``all_reduce``'s.

    Semantics: forwards to ``paddle.distributed.stream.reduce_scatter``, which reaches
    :func:`reduce_scatter_tensor` or :func:`reduce_scatter_list` below; those handle every op.
    """
    return stream.reduce_scatter(tensor, tensor_list, op=op, group=group, sync_op=sync_op, use_calc_stream=False)


@paddle.no_grad()
def reduce_scatter_tensor(out_tensor, in_tensor, op, group, sync_op, use_calc_stream, caller="reduce_scatter"):
    """Replace ``stream.reduce_scatter._reduce_scatter_tensor_in_dygraph`` with all_reduce and a slice.

    Why: gloo has no reduce_scatter ("ProcessGroupGLOO does not support reduce_scatter with sync_op
    flag"), nor its calc-stream variant. ``sequence_parallel_utils``
    (``AllGatherOp`` backward, ``ReduceScatterOp``, ``RowSequenceParallelLinear``) reaches it through
    ``dist.stream.reduce_scatter``.
    Semantics: reduce the whole input over the group, then rank ``r`` keeps the ``r``-th of ``nranks``
    equal contiguous chunks of the flattened result in ``out_tensor``. The input is left unchanged.
    Runs synchronously for any ``sync_op`` and returns a finished task.
    """
    reduced = in_tensor.clone()
    all_reduce_in_place(reduced, op, group)
    chunk = out_tensor.numel().item()
    start = group.rank * chunk
    piece = reduced.reshape([-1])[start : start + chunk].reshape(out_tensor.shape)
    paddle.assign(piece, output=out_tensor)
    return CompletedTask()


def reduce_scatter_list(tensor, tensor_list, op, group, sync_op, use_calc_stream):
    """Replace ``stream.reduce_scatter._reduce_scatter_in_dygraph`` (the list form) for the same reason.

    Semantics: rank ``r`` receives the reduction over ranks of ``tensor_list[r]``.
    """
    flat_inputs = paddle.concat([t.reshape([-1]) for t in tensor_list])
    return reduce_scatter_tensor(tensor, flat_inputs, op, group, sync_op, use_calc_stream)


_groups_by_members: dict[tuple[int, ...], object] = {}


def new_group(ranks=None, backend=None, *args, **kwargs):
    """Replace ``paddle.distributed.new_group`` with one that reuses groups and synchronises after creating one.

    Why: with 4 gloo processes, ``fleet.init`` for dp2 x mp2 failed with "Connection refused" while
    creating its groups (5 of 5 runs with Paddle 3.3.1). Fleet requests many groups with the same
    members (the mp group again as the pp-mp group, the world again as the check group). Creating
    each member set once and passing a barrier after every creation made it pass 5 of 5.
    Semantics: the first call for a member set creates the group as Paddle does; a later call with the
    same set returns that group. Every rank calls ``new_group`` in the same order, so the reuse
    decisions agree across ranks. Static-graph mode goes to Paddle's function unchanged.
    NOTE: a group destroyed with ``destroy_process_group`` stays in this cache.
    """
    create = original("paddle.distributed.new_group")
    if not paddle.in_dynamic_mode():
        return create(ranks, backend, *args, **kwargs)

    world = tuple(range(dist.get_world_size()))
    members = tuple(sorted(ranks)) if ranks is not None else world
    if members in _groups_by_members:
        return _groups_by_members[members]
    if members == world and dist.is_initialized():
        # The default group already connects every rank. A second world-sized gloo mesh (fleet's
        # check group) failed with "Connection refused" in 2 of 2 dp1 x mp2 x sharding2 runs on a loaded
        # 2-core machine; reusing the default group avoids creating it.
        _groups_by_members[members] = dist.collective._get_global_group()
        return _groups_by_members[members]
    group = create(ranks, backend, *args, **kwargs)
    _groups_by_members[members] = group
    dist.barrier()
    return group


def install() -> list[str]:
    """Install the collective replacements and return the names of the replaced Paddle symbols."""
    from paddle.distributed import collective, communication
    # The package attribute ``stream.reduce_scatter`` is the function, so import the module by path.
    stream_reduce_scatter = importlib.import_module("paddle.distributed.communication.stream.reduce_scatter")

    replace(dist, "all_reduce", all_reduce, "paddle.distributed.all_reduce")
    replace(communication, "all_reduce", all_reduce, "paddle.distributed.communication.all_reduce")
    replace(dist, "reduce_scatter", reduce_scatter, "paddle.distributed.reduce_scatter")
    replace(communication, "reduce_scatter", reduce_scatter, "paddle.distributed.communication.reduce_scatter")
    replace(
        stream_reduce_scatter,
        "_reduce_scatter_tensor_in_dygraph",
        reduce_scatter_tensor,
        "paddle.distributed.communication.stream.reduce_scatter._reduce_scatter_tensor_in_dygraph",
    )
    replace(
        stream_reduce_scatter,
        "_reduce_scatter_in_dygraph",
        reduce_scatter_list,
        "paddle.distributed.communication.stream.reduce_scatter._reduce_scatter_in_dygraph",
    )
    replace(dist, "new_group", new_group, "paddle.distributed.new_group")
    replace(collective, "new_group", new_group, "paddle.distributed.collective.new_group")
    return [
        "paddle.distributed.all_reduce (op=AVG)",
        "paddle.distributed.reduce_scatter",
        "paddle.distributed.stream.reduce_scatter (tensor and list forms)",
        "paddle.distributed.new_group (reuse + barrier)",
    ]
