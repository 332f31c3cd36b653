"""Run run_pretrain.py in a subprocess, alone or under paddle.distributed.launch, and read its metrics."""

import json
import os
import signal
import subprocess
import sys
from typing import Dict, List, Optional

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)
RUN_PRETRAIN = os.path.join(REPO_ROOT, "run_pretrain.py")


def _env() -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO_ROOT, env.get("PYTHONPATH")]))
    # One thread per process, as the launcher sets it, so 1- and 2-process runs compute alike.
    env["OMP_NUM_THREADS"] = "1"
    return env


def _read_logs(log_dir: str) -> str:
    if not log_dir or not os.path.isdir(log_dir):
        return ""
    parts = []
    for name in sorted(os.listdir(log_dir)):
        path = os.path.join(log_dir, name)
        if os.path.isfile(path):
            with open(path, errors="replace") as f:
                parts.append(f"----- {name} -----\n{f.read()[-5000:]}")
    return "\n".join(parts)


def run_pretrain(
    args: List[str],
    nproc: int = 1,
    log_dir: Optional[str] = None,
    script: str = RUN_PRETRAIN,
    script_args: Optional[List[str]] = None,
    timeout: float = 300.0,
) -> subprocess.CompletedProcess:
    """Run ``script [script_args] args`` in one process, or under the launcher with nproc processes.

    Returns the CompletedProcess; ``.logs`` holds the launcher's worker logs when nproc > 1.
    """
    command = [sys.executable]
    if nproc > 1:
        assert log_dir is not None, "a launcher run needs a log_dir"
        command += ["-m", "paddle.distributed.launch", "--nproc_per_node", str(nproc), "--log_dir", log_dir]
    command += [script, *(script_args or []), *args]
    process = subprocess.Popen(
        command, cwd=REPO_ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        raise AssertionError(f"timed out after {timeout} s: {' '.join(command)}\n{output[-5000:]}\n{_read_logs(log_dir)}")
    result = subprocess.CompletedProcess(command, process.returncode, output, "")
    result.logs = _read_logs(log_dir) if nproc > 1 else output
    return result


def read_metrics(output_dir: str) -> List[dict]:
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def train_records(output_dir: str) -> List[dict]:
    """The per-step training records (not eval records) of a run, in step order."""
    return [r for r in read_metrics(output_dir) if "loss" in r]
