"""SIGINT and SIGTERM stop run_pretrain.py with a one-line report and exit status 128 + signal."""

import os
import re
import signal
import subprocess
import sys
import time

from run_util import REPO_ROOT, RUN_PRETRAIN, _env


def long_run_args(tokens, output_dir, save_steps):
    return [
        "--input_dir", tokens, "--split", "95,5", "--max_seq_length", "32", "--per_device_train_batch_size", "2",
        "--logging_steps", "1", "--max_steps", "100000", "--save_steps", str(save_steps), "--output_dir", output_dir,
        "--disable_tqdm", "true",
    ]


def signal_when(command, ready, signal_number, timeout=120.0):
    """Start ``command``, send ``signal_number`` once ``ready()`` is true, and return (returncode, output)."""
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            assert process.poll() is None, f"exited early with {process.returncode}: {process.stdout.read()[-3000:]}"
            assert time.monotonic() < deadline, "the run did not get ready in time"
            time.sleep(0.1)
        process.send_signal(signal_number)
        output, _ = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    return process.returncode, output


def test_sigint_reports_latest_checkpoint(pattern_tokens, tmp_path):
    output_dir = str(tmp_path)
    returncode, output = signal_when(
        [sys.executable, RUN_PRETRAIN, *long_run_args(pattern_tokens, output_dir, 5)],
        lambda: os.path.isdir(os.path.join(output_dir, "checkpoint-5")), signal.SIGINT,
    )
    assert returncode == 130, output[-3000:]
    assert "Traceback" not in output
    match = re.search(r"run interrupted by SIGINT at step (\d+) of 100000\. The latest complete checkpoint is "
                      r"(\S+) \(step (\d+)\); continue from it with --resume_from_checkpoint true\.", output)
    assert match, output[-3000:]
    step, latest, latest_step = int(match.group(1)), match.group(2), int(match.group(3))
    assert step >= 5
    # The signal may stop the save of the step it arrives at; the checkpoint before it is then the latest.
    assert latest_step % 5 == 0
    assert 0 <= step - latest_step <= 5
    assert latest == os.path.join(output_dir, f"checkpoint-{latest_step}")


def test_sigterm_before_any_checkpoint(pattern_tokens, tmp_path):
    output_dir = str(tmp_path)
    returncode, output = signal_when(
        [sys.executable, RUN_PRETRAIN, *long_run_args(pattern_tokens, output_dir, 0)],
        lambda: os.path.isfile(os.path.join(output_dir, "metrics.jsonl")), signal.SIGTERM,
    )
    assert returncode == 143, output[-3000:]
    assert "Traceback" not in output
    assert re.search(rf"run interrupted by SIGTERM at step \d+ of 100000\. No checkpoint was saved in {re.escape(output_dir)}, "
                     r"so a rerun starts from step 0\.", output), output[-3000:]


def test_launcher_sigterm_stops_ranks_at_same_step(pattern_tokens, tmp_path):
    output_dir, log_dir = str(tmp_path / "out"), str(tmp_path / "log")
    command = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir", log_dir,
               RUN_PRETRAIN, *long_run_args(pattern_tokens, output_dir, 5)]
    returncode, output = signal_when(command, lambda: os.path.isdir(os.path.join(output_dir, "checkpoint-5")),
                                     signal.SIGTERM)
    # The launcher (Paddle 3.3.1) forwards SIGTERM to each worker and exits with the signal number.
    assert returncode == 15, output[-3000:]
    steps = []
    for rank in range(2):
        with open(os.path.join(log_dir, f"workerlog.{rank}"), errors="replace") as f:
            log = f.read()
        assert "Traceback" not in log, log[-3000:]
        match = re.search(rf"\[rank {rank}\] WARNING fleetlm.pretrain: run interrupted by SIGTERM at step (\d+) ", log)
        assert match, log[-3000:]
        steps.append(int(match.group(1)))
    assert steps[0] == steps[1]


def test_sigint_during_start_up_ends_quietly(pattern_tokens, tmp_path):
    # Importing Paddle takes about a second: the signal arrives while run_pretrain.py imports it.
    started = time.monotonic()
    returncode, output = signal_when(
        [sys.executable, RUN_PRETRAIN, *long_run_args(pattern_tokens, str(tmp_path), 5)],
        lambda: time.monotonic() - started > 0.3, signal.SIGINT,
    )
    assert returncode == -signal.SIGINT, output[-3000:]
    assert "Traceback" not in output
