"""One rank-aware logger for the whole package.

Every module calls ``get_logger(__name__)``. Rank 0 logs at INFO; other ranks log only warnings and
errors unless ``FLEETLM_LOG_ALL_RANKS=1`` is set, so an 8-process launch does not print every line
eight times. The rank comes from ``PADDLE_TRAINER_ID``, which ``paddle.distributed.launch`` sets
before the worker starts, so no Paddle import is needed here.
"""

import logging
import os
import sys

_ROOT = "fleetlm"
_configured = False


def process_rank() -> int:
    """Return this process's global rank as set by the launcher, 0 when not launched."""
    return int(os.environ.get("PADDLE_TRAINER_ID", "0"))


def world_size() -> int:
    """Return the number of launched processes, 1 when not launched."""
    return int(os.environ.get("PADDLE_TRAINERS_NUM", "1"))


def _configure() -> None:
    global _configured
    if _configured:
        return
    rank = process_rank()
    handler = logging.StreamHandler(sys.stderr)
    prefix = f"[rank {rank}] " if world_size() > 1 else ""
    handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger(_ROOT)
    root.addHandler(handler)
    all_ranks = os.environ.get("FLEETLM_LOG_ALL_RANKS", "0") == "1"
    root.setLevel(logging.INFO if rank == 0 or all_ranks else logging.WARNING)
    root.propagate = False
    _configured = True


def get_logger(name: str) -> logging.Logger:
    """Return a logger under the ``fleetlm`` hierarchy, configuring the handler on first use."""
    _configure()
    if not name.startswith(_ROOT):
        name = f"{_ROOT}.{name}"
    return logging.getLogger(name)
