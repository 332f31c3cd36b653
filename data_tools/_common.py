"""Helpers shared by the data_tools scripts: import path setup, one-line error exits and stop signals."""

import os
import signal
import sys
from typing import Callable, NoReturn

# The tools run from a source checkout without installing fleetlm, so the repository root goes on the path.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

# Exit status after SIGTERM: 128 + the signal number, the status a shell reports for a process that
# SIGTERM killed, so that a supervisor can tell a stop request from a data error (status 1).
EXIT_STATUS_SIGTERM = 128 + signal.SIGTERM


class Terminated(BaseException):
    """Stop request by SIGTERM: a BaseException, like KeyboardInterrupt, so that `except Exception` does not catch it."""


_main_pid = os.getpid()
_stopping = False
_worker_stop_signal = 0
_worker_send_checks = 0

# A worker that still sends a result after this many checks, 10 ms apart, is ended anyway: by then
# no thread reads the result queue any more, so cutting the message short blocks nobody.
_MAX_SEND_CHECKS = 100


def _worker_queue_locks_held(frame) -> tuple[bool, bool]:
    """Return whether this pool worker holds the task queue's read lock and the result queue's write lock.

    multiprocessing.pool.worker reads tasks under its inqueue's read lock and sends results under
    its outqueue's write lock. A worker that dies holding the read lock leaves it taken, and
    Pool.terminate in the main process then waits for it forever.
    NOTE: this reads CPython internals (3.9 to 3.13): the locals of multiprocessing.pool.worker and
    the _rlock/_wlock of SimpleQueue. Where they are not found, the worker is taken to hold no lock.
    """
    while frame is not None:
        code = frame.f_code
        if code.co_name == "worker" and code.co_filename.endswith(os.path.join("multiprocessing", "pool.py")):
            read_lock = getattr(frame.f_locals.get("inqueue"), "_rlock", None)
            write_lock = getattr(frame.f_locals.get("outqueue"), "_wlock", None)
            return (read_lock is not None and read_lock._semlock._is_mine(),
                    write_lock is not None and write_lock._semlock._is_mine())
        frame = frame.f_back
    return False, False


def _stop_worker(signum: int, frame) -> None:
    # A forked worker ignores SIGINT, because Ctrl-C reaches the whole process group and the main
    # process stops the pool. SIGTERM (from Pool.terminate or sent to the group) ends the worker as
    # the default action would, but not while it reads a task or sends a result: SIGALRM checks again.
    global _worker_stop_signal, _worker_send_checks
    if signum == signal.SIGINT:
        return
    if signum == signal.SIGTERM:
        _worker_stop_signal = signum
    reading, sending = _worker_queue_locks_held(frame)
    if sending:
        _worker_send_checks += 1
    if reading or (sending and _worker_send_checks < _MAX_SEND_CHECKS):
        signal.signal(signal.SIGALRM, _stop_worker)
        signal.setitimer(signal.ITIMER_REAL, 0.01)
        return
    signal.signal(_worker_stop_signal, signal.SIG_DFL)
    os.kill(os.getpid(), _worker_stop_signal)


def _on_stop_signal(signum: int, frame) -> None:
    global _stopping
    if os.getpid() != _main_pid:
        _stop_worker(signum, frame)
        return
    if _stopping:
        # A second stop request while the first one is being cleaned up: end now. Temporary files
        # that remain are removed by the next run that writes the same prefix.
        os._exit(128 + signum)
    _stopping = True
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Terminated


def _install_stop_handlers() -> None:
    # A signal that the parent set to be ignored (SIGINT for background jobs of a script) stays ignored.
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_stop_signal)
    if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _on_stop_signal)


def exit_with_error(message: str, status: int = 1) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(status)


def run_tool(main: Callable[[], None], handle_stop_signals: bool = True) -> None:
    """Run ``main`` and turn a data or tokenizer error into one line on stderr and exit status 1.

    With ``handle_stop_signals``, SIGINT and SIGTERM raise an exception in the main process, so the
    tool removes its temporary files and stops its worker processes before it exits: status 1 after
    SIGINT and ``EXIT_STATUS_SIGTERM`` after SIGTERM. Without it, SIGTERM ends the process at once.
    """
    from fleetlm.data.errors import DataError
    from fleetlm.tokenizer import TokenizerError

    if handle_stop_signals:
        _install_stop_handlers()
    try:
        main()
    except (DataError, TokenizerError) as error:
        exit_with_error(str(error))
    except KeyboardInterrupt:
        exit_with_error("interrupted; no output files were written")
    except Terminated:
        exit_with_error("terminated by SIGTERM; temporary files were removed and no output files were written",
                        EXIT_STATUS_SIGTERM)
