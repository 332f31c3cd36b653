"""Helpers shared by the worker scripts: run named checks and write one JSON per rank."""

import contextlib
import json
import sys
import traceback
from pathlib import Path

import numpy as np


def relative_difference(actual, expected) -> float:
    """Return max|actual - expected| / max|expected| (the denominator at least 1e-12)."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape:
        raise ValueError(f"shape mismatch: actual {actual.shape}, expected {expected.shape}")
    return float(np.max(np.abs(actual - expected)) / max(float(np.max(np.abs(expected))), 1e-12))


class CheckRecorder:
    """Collects ``{check name: result}``; a check that raises records its traceback instead."""

    def __init__(self, rank: int):
        self.rank = rank
        self.results: dict[str, dict] = {}

    @contextlib.contextmanager
    def check(self, name: str):
        result: dict = {}
        try:
            yield result
        except Exception:
            result["error"] = traceback.format_exc()
        self.results[name] = result

    def write(self, out_dir: str) -> None:
        path = Path(out_dir) / f"rank{self.rank}.json"
        path.write_text(json.dumps(self.results, indent=1))


def error_text(function, *args, **kwargs) -> str:
    """Call ``function`` and return ``"<ExceptionType>: <message>"``, or "" when it does not raise."""
    try:
        function(*args, **kwargs)
    except Exception as error:  # the point is to record whatever Paddle raises
        return f"{type(error).__name__}: {error}"
    return ""


def out_dir_argument() -> str:
    return sys.argv[1]
