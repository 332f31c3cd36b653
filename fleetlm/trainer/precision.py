"""Mixed precision: bf16 or fp16 AMP at level O2 with fp32 master weights on CUDA builds, fp32 elsewhere.

O2 keeps the parameters in the low-precision type for the matmuls and lets AdamW update an fp32
master copy (``multi_precision``). fp16 adds dynamic loss scaling; bf16 has fp32's exponent range
and needs none. On a CPU build Paddle registers no bf16 kernels for matmul, softmax or the norms,
so the run stays fp32 and logs that once.
"""

import contextlib
from dataclasses import dataclass
from typing import Optional

import paddle

from fleetlm.utils.log import get_logger

logger = get_logger(__name__)

# Initial fp16 loss scale: 2**15 is Paddle's GradScaler default and PaddleNLP's scale_loss default.
INITIAL_LOSS_SCALE = 2.0**15


@dataclass(frozen=True)
class Precision:
    """The compute type of a run: ``dtype`` None means fp32 throughout."""

    dtype: Optional[str]  # "bfloat16", "float16" or None
    reason: str

    @property
    def amp(self) -> bool:
        return self.dtype is not None

    @property
    def needs_loss_scaling(self) -> bool:
        return self.dtype == "float16"


def select_precision(bf16: bool, fp16: bool) -> Precision:
    """Choose the compute type from the bf16/fp16 switches and the Paddle build, and log the choice."""
    if not bf16 and not fp16:
        precision = Precision(None, "bf16 and fp16 are false")
    elif not paddle.is_compiled_with_cuda():
        requested = "bf16" if bf16 else "fp16"
        precision = Precision(None, f"{requested} requested, but this Paddle build has no CUDA: training runs in fp32")
        logger.warning("precision: fp32 (%s)", precision.reason)
        return precision
    else:
        dtype = "bfloat16" if bf16 else "float16"
        precision = Precision(dtype, "AMP O2 with fp32 master weights" + (" and loss scaling" if fp16 else ""))
    logger.info("precision: %s (%s)", precision.dtype or "fp32", precision.reason)
    return precision


def decorate(model, optimizer, precision: Precision):
    """Cast ``model`` to the AMP type and give ``optimizer`` fp32 master weights (O2); no-op in fp32."""
    if not precision.amp:
        return model, optimizer
    return paddle.amp.decorate(models=model, optimizers=optimizer, level="O2", dtype=precision.dtype, master_weight=True)


def autocast(precision: Precision):
    """Return the forward-pass context of ``precision``: auto_cast at O2, or nothing in fp32."""
    if not precision.amp:
        return contextlib.nullcontext()
    return paddle.amp.auto_cast(enable=True, level="O2", dtype=precision.dtype)


def make_scaler(precision: Precision, distributed: bool):
    """Build a dynamic loss scaler for fp16, wrapped for fleet when distributed; return None otherwise."""
    if not precision.needs_loss_scaling:
        return None
    scaler = paddle.amp.GradScaler(init_loss_scaling=INITIAL_LOSS_SCALE)
    if distributed:
        from paddle.distributed import fleet

        scaler = fleet.distributed_scaler(scaler)
    return scaler
