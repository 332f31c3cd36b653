"""Stop a run on SIGINT or SIGTERM with a one-line report instead of a traceback.

Start-up (``install`` until ``activate``): both signals end the process at once, as with no handler
at all, because until the first step there is nothing to save or report. A Python handler would run
only when Paddle's C++ code returns. A rank waiting in the rendezvous of ``init_parallel_env``
retries its connection in C++ until the launcher's SIGKILL 30 s later, and another rank gets its
wait interrupted with a traceback.
Training and evaluation (from ``activate``), one process: the handler raises RunInterrupted at
once, wherever the run is.
Several processes: the launcher signals its workers one after another
(``paddle.distributed.launch`` in Paddle 3.3.1 sends SIGTERM to each worker's process group, about
0.2 s apart, then SIGKILL after 30 s). A rank that raised at once would leave the others blocked in
a collective until gloo or NCCL fails. So the handler only records the signal, and the trainer
calls ``stop_requested`` after every step, which combines the ranks' records with an all-reduce.
Every rank then stops after the same step.
NOTE: a deferred signal that arrives during a step is acted on only at its end.
"""

import signal
from typing import Callable, Optional

_received: Optional[int] = None
_defer = False
_installed = False


class RunInterrupted(BaseException):
    """SIGINT or SIGTERM stopped the run. A BaseException, like KeyboardInterrupt, so ``except Exception`` lets it pass."""

    def __init__(self, signal_number: int):
        super().__init__(signal.Signals(signal_number).name)
        self.signal_number = signal_number


def _handle(signal_number: int, frame) -> None:
    global _received
    if _received is not None:
        # Repeats (the launcher sends up to three SIGTERMs) change nothing.
        return
    _received = signal_number
    if not _defer:
        raise RunInterrupted(signal_number)


def install(defer: bool) -> Callable[[], None]:
    """Let SIGINT and SIGTERM end the process at once until ``activate``; return a function that restores the previous handlers.

    ``defer`` is for ``activate``: record the signal for ``stop_requested`` instead of raising at
    once (multi-process runs). Must be called from the main thread, after ``import paddle``:
    Paddle 3.3.1 installs a C++ SIGTERM handler at import that prints a stack dump and aborts, and
    this replaces it.
    """
    global _received, _defer, _installed
    _received, _defer, _installed = None, defer, True
    previous = {number: signal.signal(number, signal.SIG_DFL) for number in (signal.SIGINT, signal.SIGTERM)}

    def restore() -> None:
        global _installed
        _installed = False
        for number, handler in previous.items():
            signal.signal(number, handler)

    return restore


def activate() -> None:
    """Report SIGINT and SIGTERM from now on (training and evaluation); nothing happens without ``install``."""
    if _installed:
        for number in (signal.SIGINT, signal.SIGTERM):
            signal.signal(number, _handle)


def received_signal() -> Optional[int]:
    """Return the first SIGINT or SIGTERM this process received since ``install``, None when none."""
    return _received


def stop_requested(distributed: bool) -> Optional[int]:
    """Return the signal that any rank received, None when none did; every rank must call it together.

    With several ranks the result is the largest signal number any rank recorded (SIGTERM over
    SIGINT), the same on every rank.
    """
    number = _received or 0
    if distributed:
        import paddle
        import paddle.distributed as dist

        flag = paddle.to_tensor([number], dtype="int64")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        number = int(flag.item())
    return number or None
