"""Pipeline parallel on CPU: ``ParallelEnv.device_id``, the p2p settings, one gloo group per stage pair."""

import paddle.distributed as dist

from fleetlm.parallel.cpu_compat._registry import original, replace


def cpu_pipeline_configs() -> dict:
    """Return the ``hybrid_configs["pp_configs"]`` entries that pipeline parallel needs on CPU.

    Batched p2p (the default) sends through ``send_on_calc_stream`` and ``batch_isend_irecv``, which gloo
    does not implement, so stages exchange activations with ordered ``isend``/``irecv`` instead.
    """
    return {"use_batch_p2p_comm": False}


def _device_id(self) -> int:
    return getattr(self, "_device_id", 0)


_pair_groups: dict[frozenset, object] = {}


def _pair_group(rank: int, peer: int):
    return _pair_groups[frozenset((rank, peer))]


def initialize_p2p_groups(hcg, enable_partial_send_recv=True, enable_timer=False):
    """Wrap ``p2p_communication.initialize_p2p_groups`` to create one 2-rank group per adjacent stage pair.

    Why: gloo numbers point-to-point messages per group, so a send and a receive between two stages of
    a pipeline group with more than two members mismatch the messages of the others and time out
    (seen with pp4 and Paddle 3.3.1).
    Semantics: Paddle's setup runs unchanged. Then every rank creates, in the same order, one group
    per stage and its next stage in every pipeline group, pairing the last stage with the first as
    ``_get_p2p_next_rank`` does. ``PipelineParallel.__init__`` calls this on every rank.
    """
    original("p2p_communication.initialize_p2p_groups")(hcg, enable_partial_send_recv, enable_timer)
    for stage_ranks in hcg.topology().get_comm_list("pipe"):
        for index, rank in enumerate(stage_ranks):
            pair = frozenset((rank, stage_ranks[(index + 1) % len(stage_ranks)]))
            if len(pair) == 2 and pair not in _pair_groups:
                _pair_groups[pair] = dist.new_group(sorted(pair))


def p2p_ops(tensor_send_prev, tensor_recv_prev, tensor_send_next, tensor_recv_next, hcg):
    """Replace ``p2p_communication._p2p_ops`` (the ``use_batch_p2p_comm=False`` path) to use the pair groups.

    Semantics: the same operations in Paddle's order, where even stages send before they receive and
    odd stages receive first. Each runs on the group of its two stages. Returns the requests to wait on.
    """
    rank = hcg.get_global_rank()
    prev_rank = hcg._get_p2p_prev_rank()
    next_rank = hcg._get_p2p_next_rank()
    send_next = (tensor_send_next, dist.isend, next_rank)
    recv_prev = (tensor_recv_prev, dist.irecv, prev_rank)
    send_prev = (tensor_send_prev, dist.isend, prev_rank)
    recv_next = (tensor_recv_next, dist.irecv, next_rank)
    if hcg.get_stage_id() % 2 == 0:
        ordered = [send_next, recv_prev, send_prev, recv_next]
    else:
        ordered = [recv_prev, send_next, recv_next, send_prev]

    requests = []
    for tensors, operation, peer in ordered:
        if tensors is None:
            continue
        group = _pair_group(rank, peer)
        for tensor in tensors if isinstance(tensors, tuple) else (tensors,):
            requests.append(operation(tensor, peer, group))
    return requests


def _is_large_pipeline_group(group) -> bool:
    from paddle.distributed.fleet.meta_parallel.pp_utils import p2p_communication

    hcg = p2p_communication._hcg
    return hcg is not None and group is hcg.get_pipe_parallel_group() and group.nranks > 2


def send_meta(self, tensor, group, reverse=False, broadcast=False):
    """Wrap ``SendRecvMeta.send_meta`` so the shape/dtype message travels on the pair group.

    Semantics: unchanged apart from the group; the broadcast variant keeps the pipeline group.
    """
    from paddle.distributed.fleet.meta_parallel.pp_utils import p2p_communication

    if not broadcast and _is_large_pipeline_group(group):
        hcg = p2p_communication._hcg
        peer = hcg._get_p2p_prev_rank() if reverse else hcg._get_p2p_next_rank()
        group = _pair_group(hcg.get_global_rank(), peer)
    return original("SendRecvMeta.send_meta")(self, tensor, group, reverse=reverse, broadcast=broadcast)


def recv_meta(self, group, reverse=False, broadcast=False):
    """Wrap ``SendRecvMeta.recv_meta`` the same way as :func:`send_meta`."""
    from paddle.distributed.fleet.meta_parallel.pp_utils import p2p_communication

    if not broadcast and _is_large_pipeline_group(group):
        hcg = p2p_communication._hcg
        peer = hcg._get_p2p_next_rank() if reverse else hcg._get_p2p_prev_rank()
        group = _pair_group(hcg.get_global_rank(), peer)
    return original("SendRecvMeta.recv_meta")(self, group, reverse=reverse, broadcast=broadcast)


def install() -> list[str]:
    """Install the pipeline replacements and return the names of the replaced Paddle symbols."""
    from paddle.distributed.fleet.meta_parallel.pp_utils import p2p_communication
    from paddle.distributed.parallel import ParallelEnv

    # ParallelEnv sets _device_id only for CUDA, XPU and custom devices, and PipelineLayer.__init__ reads
    # device_id: "AttributeError: 'ParallelEnv' object has no attribute '_device_id'". It only records it.
    replace(ParallelEnv, "device_id", property(_device_id, doc="Device id; 0 on CPU."), "ParallelEnv.device_id")
    replace(
        p2p_communication,
        "initialize_p2p_groups",
        initialize_p2p_groups,
        "p2p_communication.initialize_p2p_groups",
    )
    replace(p2p_communication, "_p2p_ops", p2p_ops, "p2p_communication._p2p_ops")
    replace(p2p_communication.SendRecvMeta, "send_meta", send_meta, "SendRecvMeta.send_meta")
    replace(p2p_communication.SendRecvMeta, "recv_meta", recv_meta, "SendRecvMeta.recv_meta")
    return [
        "ParallelEnv.device_id",
        "p2p_communication._p2p_ops and SendRecvMeta (one group per stage pair)",
    ]
