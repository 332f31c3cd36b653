"""SIGTERM and SIGINT during the data tools: temporary files removed, workers stopped, outputs kept."""

import json
import os
import random
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO_ROOT, TOKENIZERS

CREATE = os.path.join(REPO_ROOT, "data_tools", "create_pretraining_data.py")
MERGE = os.path.join(REPO_ROOT, "data_tools", "merge_data.py")


@pytest.fixture(scope="module")
def big_corpus(tmp_path_factory) -> str:
    """A 40 MB jsonl corpus: the tool needs a few seconds for it, so a signal finds it running."""
    path = tmp_path_factory.mktemp("corpus") / "big.jsonl"
    rng = random.Random(0)
    words = "to be or not that is the question whether tis nobler in mind suffer slings arrows".split()
    with open(path, "w") as handle:
        while handle.tell() < 40_000_000:
            handle.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(400))}) + "\n")
    return str(path)


def temporary_files(directory) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name.endswith(".tmp"))


def start_and_signal(command: list[str], directory, signum: int) -> subprocess.CompletedProcess:
    """Start ``command``, send ``signum`` once its .bin temporary file has data, and wait for it to end.

    The tool runs in its own session, so the returned process id is also its process group id.
    """
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and process.poll() is None:
        started = [name for name in temporary_files(directory) if ".bin." in name]
        if started and os.path.getsize(os.path.join(directory, started[0])) > 0:
            break
        time.sleep(0.01)
    assert process.poll() is None, "the tool ended before the signal; use a larger input"
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=30)
    result = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    result.pid = process.pid
    return result


def assert_process_group_gone(pid: int) -> None:
    # The tool ran in its own session, so its process group contains the tool and its workers.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise AssertionError(f"processes of group {pid} still run after the tool ended")


def wait_for_workers(process: subprocess.Popen, count: int) -> list[str]:
    """Return the process ids of the tool's worker processes once ``count`` of them run."""
    children_file = f"/proc/{process.pid}/task/{process.pid}/children"
    deadline = time.monotonic() + 30
    workers = []
    while time.monotonic() < deadline and process.poll() is None and len(workers) < count:
        with open(children_file) as handle:
            workers = handle.read().split()
        time.sleep(0.01)
    assert len(workers) == count, "the tool ended before its workers started; use a larger input"
    return workers


def create_command(corpus: str, prefix: str, workers: int, *extra: str) -> list[str]:
    return [sys.executable, CREATE, "--tokenizer_name_or_path", TOKENIZERS["gpt2"], "--input_path", corpus,
            "--output_prefix", prefix, "--workers", str(workers), *extra]


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_during_tokenizing(tmp_path, big_corpus, workers):
    command = create_command(big_corpus, str(tmp_path / "out"), workers)
    result = start_and_signal(command, tmp_path, signal.SIGTERM)

    assert result.returncode == 143
    assert os.listdir(tmp_path) == []
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: terminated by SIGTERM; temporary files were removed and no output files were written")
    assert result.stderr.count("error:") == 1
    assert_process_group_gone(result.pid)


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_keeps_existing_output(tmp_path, big_corpus, workers):
    prefix = str(tmp_path / "out")
    play = os.path.join(REPO_ROOT, "examples", "data", "shakespeare", "tempest_gut.txt")
    first = subprocess.run(create_command(play, prefix, 1), capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    before = {name: (tmp_path / name).read_bytes() for name in ("out.bin", "out.idx", "out.meta.json")}

    result = start_and_signal(create_command(big_corpus, prefix, workers, "--overwrite"), tmp_path, signal.SIGTERM)

    assert result.returncode == 143
    assert sorted(os.listdir(tmp_path)) == sorted(before)
    for name, data in before.items():
        assert (tmp_path / name).read_bytes() == data, name


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_group_stops_workers(tmp_path, big_corpus, signum):
    # Ctrl-C and service managers signal every process of the group, the workers included.
    process = subprocess.Popen(create_command(big_corpus, str(tmp_path / "out"), 2), cwd=REPO_ROOT,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not temporary_files(tmp_path):
        time.sleep(0.01)
    time.sleep(0.3)  # let the pool start
    assert process.poll() is None, "the tool ended before the signal; use a larger input"
    os.killpg(process.pid, signum)
    _, stderr = process.communicate(timeout=30)

    assert process.returncode == (143 if signum == signal.SIGTERM else 1)
    assert os.listdir(tmp_path) == []
    assert "Traceback" not in stderr
    assert_process_group_gone(process.pid)


def test_killed_worker_stops_the_run(tmp_path, big_corpus):
    # A worker killed on its own (the kernel's out-of-memory killer) ends the run with an error.
    process = subprocess.Popen(create_command(big_corpus, str(tmp_path / "out"), 2), cwd=REPO_ROOT,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    workers = wait_for_workers(process, 2)
    os.kill(int(workers[1]), signal.SIGKILL)
    _, stderr = process.communicate(timeout=30)

    assert process.returncode == 1
    assert f"error: worker process {workers[1]} was killed by signal 9 while tokenizing" in stderr
    assert os.listdir(tmp_path) == []
    assert "Traceback" not in stderr
    assert_process_group_gone(process.pid)


def write_scattered_file(prefix: str, num_sequences: int) -> None:
    """Write a valid .bin/.idx pair whose one-token sequences are stored in reverse order."""
    sizes = np.ones(num_sequences, dtype=np.int32)
    pointers = (np.arange(num_sequences, dtype=np.int64)[::-1] * 2).copy()
    document_index = np.arange(num_sequences + 1, dtype=np.int64)
    with open(prefix + ".idx", "wb") as handle:
        handle.write(b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 8, num_sequences, num_sequences + 1))
        handle.write(sizes.tobytes() + pointers.tobytes() + document_index.tobytes())
    (np.arange(num_sequences, dtype=np.int64) % 50000).astype(np.uint16).tofile(prefix + ".bin")


def test_sigterm_during_merge(tmp_path):
    # Two million sequences stored out of order are copied one by one, which takes a few seconds.
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    write_scattered_file(str(tmp_path / "in" / "scattered"), 2_000_000)
    command = [sys.executable, MERGE, "--input", str(tmp_path / "in" / "scattered"),
               "--output_prefix", str(tmp_path / "out" / "merged")]
    result = start_and_signal(command, tmp_path / "out", signal.SIGTERM)

    assert result.returncode == 143
    assert os.listdir(tmp_path / "out") == []
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: terminated by SIGTERM")


def test_workers_end_with_killed_main_process(tmp_path, big_corpus):
    # SIGKILL to the main process alone: its workers must notice and end instead of waiting forever.
    process = subprocess.Popen(create_command(big_corpus, str(tmp_path / "out"), 2), cwd=REPO_ROOT,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    wait_for_workers(process, 2)
    time.sleep(0.5)  # let the workers take tasks
    process.kill()
    process.wait()
    try:
        assert_process_group_gone(process.pid)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
