"""CPU replacements for the parts of Paddle fleet that only run on GPU or XPU.

fleetlm runs Paddle's own hybrid-parallel engine. On a CPU build (gloo collectives) several of its
primitives have no CPU kernel or no gloo implementation. :func:`apply_cpu_compat` replaces each of them
by an equivalent built on the collectives gloo supports (``all_reduce``, ``all_gather``, ``broadcast``,
``send``/``recv``). It changes nothing on CUDA or XPU builds, so GPU runs use Paddle's kernels.

Checked with PaddlePaddle 3.3.1 (CPU build). The replacements reach into private Paddle modules, so
other versions get them with a warning. ``tests/parallel`` compares each one with a single-process
reference and checks that Paddle's original still fails.

Replacements, by module:

- ``collectives``: ``all_reduce`` with ``ReduceOp.AVG``; ``reduce_scatter`` as all_reduce plus a slice
  (sequence parallel's ``AllGatherOp`` backward, ``ReduceScatterOp``, ``RowSequenceParallelLinear``);
  ``new_group`` reusing a group with the same members and passing a barrier after creating one.
- ``tensor_parallel``: ``mp_ops._c_identity``, ``_mp_allreduce``, ``_c_concat``, ``_c_split`` and
  ``_c_softmax_with_cross_entropy`` as PyLayers; the ``TensorParallel`` input broadcast.
- ``pipeline``: ``ParallelEnv.device_id``; point-to-point on one 2-rank group per adjacent stage pair.
  Batched p2p cannot be replaced: set ``pp_configs`` from :func:`cpu_pipeline_configs`.
- ``sharding``: ``group_sharded_parallel`` (stages 2 and 3) with device "cpu", the CPU parameter
  storage, and its global-norm clip.
- ``checkpoint``: ``paddle.distributed.load_state_dict`` with ``Tensor.cuda`` disabled while it runs.

Not replaced, because no exact CPU equivalent was found: sharding's ``split_param`` and
``tensor_fusion``, auto-parallel ``shard_optimizer``, ``alltoall``, and float16 collectives.
"""

import paddle

from fleetlm.parallel.cpu_compat._registry import original
from fleetlm.parallel.cpu_compat.checkpoint import tensor_cuda_disabled
from fleetlm.parallel.cpu_compat.pipeline import cpu_pipeline_configs
from fleetlm.utils.log import get_logger

__all__ = [
    "CHECKED_PADDLE_VERSIONS",
    "apply_cpu_compat",
    "cpu_pipeline_configs",
    "original",
    "tensor_cuda_disabled",
]

CHECKED_PADDLE_VERSIONS = ("3.3.1",)

logger = get_logger(__name__)
_applied: list[str] | None = None


def apply_cpu_compat() -> list[str]:
    """Install the CPU replacements once and return the names of the replaced Paddle symbols.

    Call it before ``fleet.init``: the group reuse must be in place when fleet creates its groups.
    Returns [] and changes nothing when Paddle is compiled with CUDA or XPU. A second call changes
    nothing and returns the same names.
    """
    global _applied
    if paddle.is_compiled_with_cuda() or paddle.is_compiled_with_xpu():
        return []
    if _applied is not None:
        return list(_applied)

    if paddle.__version__ not in CHECKED_PADDLE_VERSIONS:
        logger.warning(
            "fleetlm's CPU replacements for Paddle fleet were checked with Paddle %s, but Paddle %s is "
            "installed; they patch private Paddle modules and may be wrong or unnecessary here. "
            "Run tests/parallel to check them.",
            ", ".join(CHECKED_PADDLE_VERSIONS),
            paddle.__version__,
        )
    if paddle.distributed.is_initialized():
        logger.warning(
            "apply_cpu_compat() was called after the parallel environment was initialised; groups "
            "created before it are not deduplicated. Call it before fleet.init."
        )

    from fleetlm.parallel.cpu_compat import checkpoint, collectives, pipeline, sharding, tensor_parallel

    replaced: list[str] = []
    for module in (collectives, tensor_parallel, pipeline, sharding, checkpoint):
        replaced += module.install()
    _applied = replaced
    logger.info("Paddle CPU replacements applied: %s", "; ".join(replaced))
    return list(replaced)
