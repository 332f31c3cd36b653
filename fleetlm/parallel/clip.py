"""Global-norm gradient clipping that gives the single-process norm in every parallel layout.

The optimizer calls the clip with the (parameter, gradient) pairs it updates on this rank, after
fleet has synchronised the gradients. Each gradient element of the model must enter the squared
sum exactly once over all ranks:
    tensor parallel   split parameters count on every rank; replicated ones (norm weights) on rank 0
    pipeline          each stage counts its own parameters; the second copy of a tied embedding/head
                      (``is_firstly_shared = False``) does not count
    sharding          each rank counts the parameters (stage 3: the slices) it updates; stage 3's
                      unsliced small parameters are replicated and count on sharding rank 0
    data parallel     gradients are already equal on every replica, so nothing is summed
The local sums are then all-reduced (SUM) over the tensor, pipeline and sharding groups in turn.
"""

import math
from typing import List, Optional

import paddle
import paddle.distributed as dist
from paddle.nn.clip import ClipGradBase


class NonFiniteGradientError(RuntimeError):
    """The global gradient norm is NaN or infinite; raised inside the optimizer step, before any update."""


class GlobalNormClip(ClipGradBase):
    """Scale gradients so their global L2 norm is at most ``max_norm`` (0: measure only); keeps the norm.

    ``last_norm`` is the norm before clipping, equal on every rank. Scaling uses
    ``max_norm / max(norm, max_norm)``, the rule of ``paddle.nn.ClipGradByGlobalNorm`` without its
    1e-6 guard, so a single process reproduces the same update bit for bit.
    """

    def __init__(self, max_norm: float, hcg=None):
        super().__init__()
        self.max_norm = max_norm
        self.last_norm: Optional[float] = None
        self._groups: List = []
        self._mp_rank = 0
        self._sharding_rank = 0
        if hcg is not None:
            self._mp_rank = hcg.get_model_parallel_rank()
            self._sharding_rank = hcg.get_sharding_parallel_rank()
            if hcg.get_model_parallel_world_size() > 1:
                self._groups.append(hcg.get_model_parallel_group())
            if hcg.get_pipe_parallel_world_size() > 1:
                self._groups.append(hcg.get_pipe_parallel_group())
            if hcg.get_sharding_parallel_world_size() > 1:
                self._groups.append(hcg.get_sharding_parallel_group())

    def counts(self, parameter) -> bool:
        """Return True when this rank adds ``parameter``'s gradient to the squared sum."""
        if getattr(parameter, "is_firstly_shared", True) is False:
            return False
        if getattr(parameter, "unslice", False) and self._sharding_rank != 0:
            return False
        if not getattr(parameter, "is_distributed", False) and self._mp_rank != 0:
            return False
        return True

    @paddle.no_grad()
    def _dygraph_clip(self, params_grads):
        squares = [
            paddle.sum(grad.astype("float32") ** 2)
            for parameter, grad in params_grads
            if grad is not None and self.counts(parameter)
        ]
        total = paddle.add_n(squares).reshape([1]) if squares else paddle.zeros([1], dtype="float32")
        for group in self._groups:
            dist.all_reduce(total, group=group)
        norm = paddle.sqrt(total).item()
        self.last_norm = norm
        if not math.isfinite(norm):
            raise NonFiniteGradientError(f"gradient norm is {norm}")
        if self.max_norm > 0:
            scale = self.max_norm / max(norm, self.max_norm)
            if scale < 1.0:
                for _, grad in params_grads:
                    if grad is not None:
                        grad.scale_(scale)
        return params_grads
