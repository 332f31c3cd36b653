"""Helpers shared by the data_tools scripts: import path setup and one-line error exits."""

import os
import sys
from typing import Callable, NoReturn

# The tools run from a source checkout without installing fleetlm, so the repository root goes on the path.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)


def exit_with_error(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def run_tool(main: Callable[[], None]) -> None:
    """Run ``main`` and turn a data or tokenizer error into one line on stderr and exit status 1."""
    from fleetlm.data.errors import DataError
    from fleetlm.tokenizer import TokenizerError

    try:
        main()
    except (DataError, TokenizerError) as error:
        exit_with_error(str(error))
    except KeyboardInterrupt:
        exit_with_error("interrupted; no output files were written")
