"""Run-time choice between Paddle's fused GPU kernels and plain implementations.

Each choice is made once per process from what the Paddle build offers, logged once, and can be
read back with ``selected_kernels()`` (the start-up log and the tests use it). A fused kernel is
chosen only when the user asked for it *and* the build is a CUDA build: on CPU builds Paddle either
has no kernel (fused rotary) or runs an unfused math path behind the fused name (flash attention),
so the plain implementation is used and the fallback is logged.
"""

from typing import Dict

import paddle

from fleetlm.utils.log import get_logger

logger = get_logger(__name__)

_selected: Dict[str, str] = {}


def _gpu_build() -> bool:
    return paddle.is_compiled_with_cuda()


def _record(kind: str, choice: str, reason: str) -> None:
    if _selected.get(kind) != choice:
        _selected[kind] = choice
        logger.info("%s kernel: %s (%s)", kind, choice, reason)


def selected_kernels() -> Dict[str, str]:
    """Return the kernel chosen for each kind so far, e.g. {'attention': 'flash_attention'}."""
    return dict(_selected)


def use_flash_attention(requested: bool) -> bool:
    """Return True when attention should call paddle's flash_attention kernel."""
    if not requested:
        _record("attention", "plain", "use_flash_attention is false")
        return False
    if not _gpu_build():
        _record("attention", "plain", "use_flash_attention requested, but this Paddle build has no CUDA")
        return False
    _record("attention", "flash_attention", "use_flash_attention on a CUDA build")
    return True


def use_fused_rms_norm(requested: bool) -> bool:
    """Return True when RMSNorm should call paddle.incubate's fused_rms_norm kernel."""
    if not requested:
        _record("rms_norm", "plain", "use_fused_rms_norm is false")
        return False
    if not _gpu_build():
        _record("rms_norm", "plain", "use_fused_rms_norm requested, but this Paddle build has no CUDA")
        return False
    _record("rms_norm", "fused_rms_norm", "use_fused_rms_norm on a CUDA build")
    return True


def use_fused_rope(requested: bool) -> bool:
    """Return True when rotary embedding should call fused_rotary_position_embedding."""
    if not requested:
        _record("rotary", "plain", "use_fused_rope is false")
        return False
    if not _gpu_build():
        _record("rotary", "plain", "use_fused_rope requested, but this Paddle build has no CUDA kernel for it")
        return False
    _record("rotary", "fused_rotary_position_embedding", "use_fused_rope on a CUDA build")
    return True


def use_fused_swiglu(requested: bool) -> bool:
    """Return True when the gated MLP should call paddle.incubate's fused swiglu kernel."""
    if not requested:
        _record("swiglu", "plain", "use_fused_swiglu is false")
        return False
    if not _gpu_build():
        _record("swiglu", "plain", "use_fused_swiglu requested, but this Paddle build has no CUDA")
        return False
    _record("swiglu", "fused_swiglu", "use_fused_swiglu on a CUDA build")
    return True
