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


def _on_stop_signal(signum: int, frame) -> None:
    global _stopping
    if os.getpid() != _main_pid:
        # A worker that has not installed its own handlers yet (fleetlm.data.preprocess): SIGINT is
        # left to the main process, SIGTERM ends the worker as it would without a handler.
        if signum == signal.SIGTERM:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
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


def check_output_prefix(parser, prefix: str, overwrite: bool, example: str) -> None:
    """Exit with status 2 (``parser.error``) for an output prefix with a suffix, or whose files exist without ``overwrite``."""
    if not os.path.basename(prefix) or prefix.endswith((".bin", ".idx")):
        parser.error(f"--output_prefix {prefix!r}: give a path without suffix, e.g. {example} for "
                     f"{example}.bin and {example}.idx")
    outputs = (prefix + ".bin", prefix + ".idx", prefix + ".meta.json")
    for path in outputs:
        if os.path.isdir(path):
            parser.error(f"{path} is a directory; remove it or choose another --output_prefix")
    existing = [path for path in outputs if os.path.exists(path)]
    if existing and not overwrite:
        parser.error(f"{existing[0]} already exists; pass --overwrite to replace it, or choose another --output_prefix")


def check_json_keys(parser, args) -> None:
    """Default ``args.json_key`` to ["text"]; exit with status 2 when it names a key twice, which would repeat its text.

    ``--json_key`` takes several keys and may be repeated (argparse's "extend"): ``--json_key text
    --json_key title`` is ``--json_key text title``.
    """
    if args.json_key is None:
        args.json_key = ["text"]
    keys = args.json_key
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        parser.error(f"--json_key names {', '.join(map(repr, repeated))} more than once; give each key once")


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
    except OSError as error:
        # A read-only or full output directory, or a directory where an output file should be.
        where = f"{error.filename}: " if error.filename else ""
        exit_with_error(f"{where}{error.strerror or error}; check the permissions and free space of the output "
                        f"directory; no output files were written")
    except KeyboardInterrupt:
        exit_with_error("interrupted; no output files were written")
    except Terminated:
        exit_with_error("terminated by SIGTERM; temporary files were removed and no output files were written",
                        EXIT_STATUS_SIGTERM)
