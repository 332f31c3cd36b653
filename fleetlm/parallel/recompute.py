"""Activation recompute applied from outside the model, at the granularity PaddleNLP names.

    full       each decoder block keeps only its input; the whole block reruns in backward
    full_attn  the attention module (projections, rotary, attention) reruns; the MLP keeps activations
    core_attn  only softmax(QK^T / sqrt(d)) V reruns, the part whose activations grow with seq_len^2

Blocks listed in ``no_recompute_layers`` keep all activations. The wrapping replaces a module's
``forward`` on the instance, so parameter names and the model code stay as they are. It uses
``fleet.utils.recompute`` (reentrant), which restores the RNG state so dropout masks repeat.
"""

from typing import Iterable, Optional

import paddle.nn as nn

from fleetlm.parallel.plan import ParallelPlan, submodule
from fleetlm.utils.log import get_logger

logger = get_logger(__name__)


def _recompute_method(owner, method_name: str) -> None:
    from paddle.distributed.fleet.utils import recompute

    inner = getattr(owner, method_name)
    is_layer = isinstance(owner, nn.Layer)

    def recomputed(*args, **kwargs):
        if is_layer and not owner.training:
            return inner(*args, **kwargs)
        return recompute(inner, *args, **kwargs)

    setattr(owner, method_name, recomputed)


def apply_recompute(
    model: nn.Layer, plan: ParallelPlan, granularity: str, no_recompute_layers: Optional[Iterable[int]] = None
) -> int:
    """Wrap the blocks of ``model`` for recompute at ``granularity``; return how many blocks were wrapped."""
    skipped = set(no_recompute_layers or ())
    blocks = submodule(submodule(model, plan.backbone), plan.blocks)
    wrapped = 0
    for index, block in enumerate(blocks):
        if index in skipped:
            continue
        if granularity == "full":
            _recompute_method(block, "forward")
        elif granularity == "full_attn":
            _recompute_method(submodule(block, plan.attention), "forward")
        elif granularity == "core_attn":
            _recompute_method(submodule(block, plan.attention), "core_attention")
        else:
            raise ValueError(f"recompute_granularity={granularity!r}; expected full, full_attn or core_attn")
        wrapped += 1
    logger.info(
        "recompute: granularity %s on %d of %d blocks (no_recompute_layers=%s)",
        granularity, wrapped, len(blocks), sorted(skipped),
    )
    return wrapped
