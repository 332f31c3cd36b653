"""``paddle.distributed.load_state_dict`` on CPU: its resharding moves tensors with ``Tensor.cuda()``."""

import contextlib
import importlib
from collections.abc import Iterator

import paddle

from fleetlm.parallel.cpu_compat._registry import original, replace


def _return_self(tensor, *args, **kwargs):
    return tensor


@contextlib.contextmanager
def tensor_cuda_disabled() -> Iterator[None]:
    """Make ``paddle.Tensor.cuda`` return the tensor itself while the block runs, then restore it.

    Paddle code that stages data on the GPU before a collective (checkpoint resharding, sharding's
    gradient clip) then keeps it on the CPU, where gloo reduces it. Not thread-safe: another thread
    calling ``Tensor.cuda`` during the block also gets the CPU tensor.
    """
    saved = paddle.Tensor.cuda
    paddle.Tensor.cuda = _return_self
    try:
        yield
    finally:
        paddle.Tensor.cuda = saved


def load_state_dict(*args, **kwargs):
    """Replace ``paddle.distributed.load_state_dict`` with the same function run under :func:`tensor_cuda_disabled`.

    Why: loading on more than one rank reshards through ``reshard_comm``/``resharder``, which call
    ``.cuda()`` on the tensors they exchange; on a CPU build that raises "No available device found".
    Semantics: unchanged, with the exchanged tensors kept on the CPU.
    """
    with tensor_cuda_disabled():
        return original("paddle.distributed.load_state_dict")(*args, **kwargs)


def install() -> list[str]:
    """Install the checkpoint replacement and return the names of the replaced Paddle symbols."""
    import paddle.distributed as dist
    dcp_load = importlib.import_module("paddle.distributed.flex_checkpoint.dcp.load_state_dict")

    replace(dist, "load_state_dict", load_state_dict, "paddle.distributed.load_state_dict")
    replace(dcp_load, "load_state_dict", load_state_dict, "flex_checkpoint.dcp.load_state_dict.load_state_dict")
    return ["paddle.distributed.load_state_dict (Tensor.cuda disabled while it runs)"]
