"""``group_sharded_parallel`` (sharding stages 2 and 3) on CPU.

Paddle 3.3.1's group-sharded classes run on CPU tensors once four device checks are passed: the
device assert of ``group_sharded_parallel``, the compile-flag asserts of
``GroupShardedOptimizerStage2`` and ``GroupShardedStage3``, the device id parsed from
``paddle.get_device()`` ("cpu" has no ``:id``), and the ``.cuda()`` in the gradient clip.
"""

import contextlib
from collections.abc import Iterator
from typing import Any

import paddle

from fleetlm.parallel.cpu_compat._registry import original, replace
from fleetlm.parallel.cpu_compat.checkpoint import tensor_cuda_disabled


class _CoreForShardingAsserts:
    """Stand-in for ``paddle.framework.core`` inside the group-sharded modules during construction.

    Its ``is_compiled_with_cuda()`` returns True so that the constructor asserts
    ``core.is_compiled_with_cuda() or core.is_compiled_with_xpu() or device in custom devices``
    ("Only GPU and XPU and CustomDevice is supported now") pass for device "cpu". In Paddle 3.3.1
    those asserts are the only reads of ``core.is_compiled_with_cuda`` in both modules; every other
    attribute is the real one.
    """

    def __init__(self, core):
        self._core = core

    def is_compiled_with_cuda(self) -> bool:
        return True

    def __getattr__(self, name: str) -> Any:
        return getattr(self._core, name)


def _cpu_device_with_id() -> str:
    return "cpu:0"


@contextlib.contextmanager
def _sharding_construction_on_cpu() -> Iterator[None]:
    """Pass the device checks of the group-sharded constructors for device "cpu" while the block runs.

    ``paddle.get_device()`` reads "cpu:0" instead of "cpu", because the constructors parse a device id
    with ``split(":")[1]`` and hand the string to ``GroupShardedClipGrad``.
    """
    from paddle.distributed.fleet.meta_parallel.sharding import (
        group_sharded_optimizer_stage2,
        group_sharded_stage3,
    )

    modules = [group_sharded_optimizer_stage2, group_sharded_stage3]
    saved_cores = [module.core for module in modules]
    saved_get_device = paddle.get_device
    for module, core in zip(modules, saved_cores):
        module.core = _CoreForShardingAsserts(core)
    paddle.get_device = _cpu_device_with_id
    try:
        yield
    finally:
        paddle.get_device = saved_get_device
        for module, core in zip(modules, saved_cores):
            module.core = core


def group_sharded_parallel(
    model,
    optimizer,
    level,
    scaler=None,
    group=None,
    offload=False,
    sync_buffers=False,
    buffer_max_size=2**23,
    segment_size=2**20,
    sync_comm=False,
    dp_group=None,
    exclude_layer=None,
):
    """Replace ``paddle.distributed.sharding.group_sharded_parallel`` with a CPU version.

    Why: it asserts "group_sharded_parallel only support gpu, xpu and custom_device now" before doing
    anything, and the classes it builds fail their own device checks (see the module docstring).
    Semantics: the same dispatch with device "cpu". Levels "os" and "os_g" build
    ``GroupShardedOptimizerStage2`` and ``GroupShardedStage2`` (Paddle implements "os" as "os_g");
    "p_g_os" builds ``GroupShardedStage3``; a ``GradScaler`` is wrapped in ``GroupShardedScaler``.
    Returns ``(model, optimizer, scaler)``.
    """
    from paddle.distributed.fleet.meta_parallel.sharding.group_sharded_optimizer_stage2 import (
        GroupShardedOptimizerStage2,
    )
    from paddle.distributed.fleet.meta_parallel.sharding.group_sharded_stage2 import GroupShardedStage2
    from paddle.distributed.fleet.meta_parallel.sharding.group_sharded_stage3 import GroupShardedStage3
    from paddle.distributed.fleet.meta_parallel.sharding.group_sharded_utils import GroupShardedScaler

    if level not in ("os", "os_g", "p_g_os"):
        raise ValueError(f"invalid sharding level {level!r}; expected 'os', 'os_g' or 'p_g_os'")

    with _sharding_construction_on_cpu():
        if level in ("os", "os_g"):
            optimizer = GroupShardedOptimizerStage2(
                params=optimizer._parameter_list,
                optim=optimizer,
                group=group,
                offload=offload,
                dp_group=dp_group,
                device="cpu",
            )
            model = GroupShardedStage2(
                model,
                optimizer,
                group=group,
                sync_buffers=sync_buffers,
                buffer_max_size=buffer_max_size,
                dp_group=dp_group,
                device="cpu",
            )
        else:
            model = GroupShardedStage3(
                model,
                optimizer=optimizer,
                group=group,
                sync_buffers=sync_buffers,
                segment_size=segment_size,
                offload=offload,
                sync_comm=sync_comm,
                dp_group=dp_group,
                device="cpu",
                exclude_layer=exclude_layer,
            )
    if isinstance(scaler, paddle.amp.GradScaler):
        scaler = GroupShardedScaler(scaler)
    return model, optimizer, scaler


def add_rank_params(self, trainable_params, param2align, convert_gpu=True):
    """Wrap ``ParamStorage.add_rank_params`` to keep a CPU storage on the CPU.

    Why: with ``convert_gpu=True`` (what ``GroupShardedOptimizerStage2`` passes) each parameter is copied
    out with ``param.cpu()`` and then wiped with ``_clear_data()``. On CPU, ``cpu()`` returns the same
    storage, so the parameter values are lost. The buffer is then moved with ``cvt_to_device``, which
    raises "Only supported compiled paddle with gpu/rocm and xpu, but current version is compiled
    with cpu."
    Semantics: for a storage on device "cpu", the ``convert_gpu=False`` path: each parameter's values
    are copied into the flat buffer and the parameter becomes a view of its slice.
    """
    if self._device == "cpu":
        convert_gpu = False
    return original("ParamStorage.add_rank_params")(self, trainable_params, param2align, convert_gpu)


def clip_on_cpu(self, params_grads):
    """Wrap ``GroupShardedClipGrad._dygraph_clip`` so the global-norm clip of stages 2 and 3 runs on CPU.

    Why: the clip parses a device id from its device string (``int("cpu".split(":")[1])`` raises
    IndexError) and, when the current device is the CPU, moves the squared norm with ``.cuda(dev_id)``
    before all-reducing it.
    Semantics: Paddle's clip unchanged, with the device string "cpu:0" and ``Tensor.cuda`` returning
    the CPU tensor, so the squared norms are summed over the sharding group on the CPU.
    """
    if self._device == "cpu":
        self._device = "cpu:0"
    with tensor_cuda_disabled():
        return original("GroupShardedClipGrad._dygraph_clip")(self, params_grads)


def install() -> list[str]:
    """Install the sharding replacements and return the names of the replaced Paddle symbols."""
    from paddle.distributed import sharding
    from paddle.distributed.fleet.meta_parallel.sharding import group_sharded_storage, group_sharded_utils
    from paddle.distributed.sharding import group_sharded

    replace(sharding, "group_sharded_parallel", group_sharded_parallel, "sharding.group_sharded_parallel")
    replace(
        group_sharded,
        "group_sharded_parallel",
        group_sharded_parallel,
        "sharding.group_sharded.group_sharded_parallel",
    )
    replace(
        group_sharded_storage.ParamStorage,
        "add_rank_params",
        add_rank_params,
        "ParamStorage.add_rank_params",
    )
    replace(
        group_sharded_utils.GroupShardedClipGrad,
        "_dygraph_clip",
        clip_on_cpu,
        "GroupShardedClipGrad._dygraph_clip",
    )
    return [
        "paddle.distributed.sharding.group_sharded_parallel",
        "ParamStorage.add_rank_params (CPU storage)",
        "GroupShardedClipGrad._dygraph_clip",
    ]
