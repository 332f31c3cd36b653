"""Run run_pretrain.py in a subprocess, alone or under paddle.distributed.launch, and read its metrics."""

import json
import os
import shutil
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


def _read_logs(log_dir: str, tail: int = 5000) -> str:
    """The last ``tail`` characters of each worker's log (the launcher's env dumps left out)."""
    if not log_dir or not os.path.isdir(log_dir):
        return ""
    parts = []
    for name in sorted(os.listdir(log_dir)):
        path = os.path.join(log_dir, name)
        if name.startswith("workerlog.") and os.path.isfile(path):
            with open(path, errors="replace") as f:
                parts.append(f"----- {name} -----\n{f.read()[-tail:]}")
    return "\n".join(parts)


def describe(result: subprocess.CompletedProcess, tail: int = 3000) -> str:
    """Exit status, the launcher's own output and every worker log's tail, for an assertion message.

    Every worker gets its share: a failure on rank 1 is not pushed out by rank 0's longer log.
    """
    parts = [f"exit status {result.returncode}: {' '.join(result.args)}",
             f"----- launcher / process output -----\n{result.stdout[-tail:]}"]
    if getattr(result, "log_dir", None):
        parts.append(_read_logs(result.log_dir, tail))
    return "\n".join(parts)


# NOTE: Paddle 3.3.1's TCP store sometimes fails to bind the port the launcher picked for it and
# aborts in libuv while it cleans up ("uv__finish_close: Assertion ... failed", C++ traceback through
# TCPServer::create), before any training: by estimate once in several hundred launches on 2 cores.
# A launch that died that way, with no step trained, is started once more.
_TCP_STORE_ABORT = ("uv__finish_close", "TCPServer::create")


def _tcp_store_abort(log_dir: Optional[str]) -> bool:
    logs = _read_logs(log_dir, tail=20000)
    return all(marker in logs for marker in _TCP_STORE_ABORT) and " step 1/" not in logs


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
    result = _run_once(args, nproc, log_dir, script, script_args, timeout)
    if nproc > 1 and result.returncode != 0 and _tcp_store_abort(log_dir):
        print(f"relaunching after Paddle's TCP store aborted at start-up:\n{describe(result)}", file=sys.stderr)
        shutil.rmtree(log_dir, ignore_errors=True)
        result = _run_once(args, nproc, log_dir, script, script_args, timeout)
    return result


def _run_once(args, nproc, log_dir, script, script_args, timeout) -> subprocess.CompletedProcess:
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
    result.log_dir = log_dir if nproc > 1 else None
    return result


def read_metrics(output_dir: str) -> List[dict]:
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def train_records(output_dir: str) -> List[dict]:
    """The per-step training records (not eval records) of a run, in step order."""
    return [r for r in read_metrics(output_dir) if "loss" in r]


class RunCache:
    """Launches each keyed run once and shares it between the tests of a module.

    A failed launch is remembered too: every later test that needs the run fails with the first
    launch's report instead of relaunching into the half-written output directory.
    """

    def __init__(self, root: str, base_args):
        self.root = root
        self.base_args = base_args  # output_dir -> the arguments every run shares
        self.done: Dict[str, tuple] = {}
        self.failed: Dict[str, str] = {}

    def launch(self, key: str, nproc: int, extra: List[str]) -> tuple:
        """Return ``(output_dir, worker logs)`` of run ``key``, launching it on first request."""
        if key in self.failed:
            raise AssertionError(f"{key} failed earlier in this module:\n{self.failed[key]}")
        if key not in self.done:
            output_dir = os.path.join(self.root, key)
            result = run_pretrain(self.base_args(output_dir) + extra, nproc=nproc,
                                  log_dir=os.path.join(self.root, f"log-{key}"))
            if result.returncode != 0:
                self.failed[key] = describe(result)
                raise AssertionError(f"{key} failed:\n{self.failed[key]}")
            self.done[key] = (output_dir, result.logs)
        return self.done[key]
