"""Run a worker script under ``paddle.distributed.launch`` and collect the JSON each rank writes.

A worker receives its output folder as the first argument and writes ``rank<N>.json`` there.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKERS = Path(__file__).resolve().parent / "workers"


def _descendants(pid: int) -> list[int]:
    """Return the ids of all processes below ``pid``; the launcher starts each worker in its own session."""
    children: dict[int, list[int]] = {}
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat_file.parent.name))
    found, pending = [], [pid]
    while pending:
        for child in children.get(pending.pop(), []):
            found.append(child)
            pending.append(child)
    return found


def _kill_tree(pid: int) -> None:
    for process_id in [pid, *_descendants(pid)]:
        try:
            os.kill(process_id, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _read_logs(log_dir: Path, max_chars_per_file: int = 6000) -> str:
    parts = []
    for log_file in sorted(log_dir.glob("*")):
        if log_file.is_file():
            text = log_file.read_text(errors="replace")
            parts.append(f"----- {log_file.name} (last {max_chars_per_file} characters) -----\n{text[-max_chars_per_file:]}")
    return "\n".join(parts) or "(no worker logs written)"


def launch(worker: str, nproc: int, args: tuple[str, ...] = (), timeout: float = 180.0) -> list[dict]:
    """Launch ``workers/<worker>`` on ``nproc`` CPU processes and return each rank's JSON, rank order.

    Raises AssertionError with the launcher output and the worker logs when the launch fails, times
    out (the launcher and its workers are killed) or a rank writes no result.
    """
    with tempfile.TemporaryDirectory(prefix="fleetlm-launch-") as tmp:
        out_dir = Path(tmp) / "out"
        log_dir = Path(tmp) / "log"
        out_dir.mkdir()
        command = [
            sys.executable, "-m", "paddle.distributed.launch",
            "--nproc_per_node", str(nproc),
            "--log_dir", str(log_dir),
            str(WORKERS / worker), str(out_dir), *args,
        ]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        env.setdefault("FLEETLM_LOG_ALL_RANKS", "1")
        process = subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            output, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_tree(process.pid)
            output, _ = process.communicate()
            raise AssertionError(
                f"{worker} with {nproc} processes timed out after {timeout} s\n{output[-4000:]}\n{_read_logs(log_dir)}"
            ) from None

        if process.returncode != 0:
            raise AssertionError(
                f"{worker} with {nproc} processes failed with exit code {process.returncode}\n"
                f"{output[-4000:]}\n{_read_logs(log_dir)}"
            )
        results = []
        for rank in range(nproc):
            result_file = out_dir / f"rank{rank}.json"
            if not result_file.exists():
                raise AssertionError(f"rank {rank} of {worker} wrote no {result_file.name}\n{_read_logs(log_dir)}")
            results.append(json.loads(result_file.read_text()))
        return results
