"""Learning-rate schedule: linear warmup, then cosine, linear or constant to min_learning_rate."""

import math
from typing import Tuple

from paddle.optimizer.lr import LRScheduler


class WarmupDecayLR(LRScheduler):
    """Learning rate for optimizer step t (0-based; ``last_epoch`` counts steps taken).

    warmup (t < warmup_steps): max_lr * (t + 1) / warmup_steps, so the first step already moves.
    decay (warmup_steps <= t < decay_steps), with progress p = (t - warmup_steps) / (decay_steps - warmup_steps):
        cosine:   min_lr + (max_lr - min_lr) * 0.5 * (1 + cos(pi * p))
        linear:   min_lr + (max_lr - min_lr) * (1 - p)
        constant: max_lr
    after decay_steps: min_lr (constant keeps max_lr).
    """

    def __init__(self, max_lr: float, min_lr: float, warmup_steps: int, decay_steps: int, kind: str):
        if kind not in ("cosine", "linear", "constant"):
            raise ValueError(f"lr_scheduler_type '{kind}' is not one of 'cosine', 'linear', 'constant'")
        self.max_lr = max_lr
        self.min_lr = min_lr
        self.warmup_steps = warmup_steps
        self.decay_steps = max(decay_steps, warmup_steps)
        self.kind = kind
        # LRScheduler calls step() once here, which makes last_epoch 0: the rate of the first step.
        super().__init__(learning_rate=max_lr, last_epoch=-1)

    def get_lr(self) -> float:
        return learning_rate_at(self.last_epoch, *self.settings())

    def settings(self) -> Tuple[float, float, int, int, str]:
        """Return (max_lr, min_lr, warmup_steps, decay_steps, kind): everything that decides the schedule."""
        return self.max_lr, self.min_lr, self.warmup_steps, self.decay_steps, self.kind


def learning_rate_at(t: int, max_lr: float, min_lr: float, warmup_steps: int, decay_steps: int, kind: str) -> float:
    """Return the rate of optimizer step ``t`` (0-based) under the schedule of the class docstring."""
    if t < warmup_steps:
        return max_lr * (t + 1) / warmup_steps
    if kind == "constant":
        return max_lr
    if t >= decay_steps:
        return min_lr
    progress = (t - warmup_steps) / max(1, decay_steps - warmup_steps)
    if kind == "cosine":
        return min_lr + (max_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr + (max_lr - min_lr) * (1.0 - progress)


def resolve_warmup_steps(args) -> int:
    """Return the warmup length in optimizer steps: warmup_steps when set, else warmup_ratio x max_steps."""
    return args.warmup_steps if args.warmup_steps > 0 else int(args.warmup_ratio * args.max_steps)


def schedule_settings(args) -> Tuple[float, float, int, int, str]:
    """Return (max_lr, min_lr, warmup_steps, decay_steps, kind) of TrainingArguments or an object with the same fields.

    warmup_steps wins over warmup_ratio; decay_steps 0 means max_steps; the decay never ends before the warmup.
    """
    warmup = resolve_warmup_steps(args)
    decay = args.decay_steps if args.decay_steps > 0 else args.max_steps
    return args.learning_rate, args.min_learning_rate, warmup, max(decay, warmup), args.lr_scheduler_type


def build_lr_scheduler(args) -> WarmupDecayLR:
    """Build the schedule from TrainingArguments."""
    return WarmupDecayLR(*schedule_settings(args))
