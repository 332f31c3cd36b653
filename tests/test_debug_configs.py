"""The *-debug.json argument files train, unchanged, on the data that ``python -m fleetlm.data.synthetic`` writes."""

import subprocess
import sys

from run_util import REPO_ROOT, RUN_PRETRAIN, _env


def test_debug_file_trains_on_synthetic_data(tmp_path):
    synthetic = subprocess.run([sys.executable, "-m", "fleetlm.data.synthetic"], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert synthetic.returncode == 0, synthetic.stderr
    assert (tmp_path / "data" / "debug_pattern.idx").is_file()
    # The file's own relative paths (./data/debug_pattern, ./checkpoints/llama-debug), from the working directory.
    run = subprocess.run([sys.executable, RUN_PRETRAIN, f"{REPO_ROOT}/llama/pretrain_llama-debug.json", "--max_steps", "2",
                          "--eval_steps", "2", "--save_steps", "2"],
                         cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert (tmp_path / "checkpoints" / "llama-debug" / "checkpoint-2" / "trainer_state.json").is_file()


def test_synthetic_data_rejects_bad_sizes(tmp_path):
    result = subprocess.run([sys.executable, "-m", "fleetlm.data.synthetic", "--vocab_size", "70000"], cwd=tmp_path,
                            env=_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "--vocab_size 70000: give 5 to 65536" in result.stderr


def test_synthetic_data_keeps_existing_files(tmp_path):
    def synthetic(*args):
        return subprocess.run([sys.executable, "-m", "fleetlm.data.synthetic", *args], cwd=tmp_path, env=_env(),
                              capture_output=True, text=True, timeout=120)

    assert synthetic("corpus").returncode == 0
    before = (tmp_path / "corpus.bin").read_bytes()
    again = synthetic("corpus", "--seed", "3")
    assert again.returncode == 2
    assert "corpus.bin already exists; pass --overwrite to replace it" in again.stderr
    assert (tmp_path / "corpus.bin").read_bytes() == before
    assert synthetic("corpus", "--seed", "3", "--overwrite").returncode == 0
    assert (tmp_path / "corpus.bin").read_bytes() != before
    under_file = synthetic("corpus.bin/x")
    assert under_file.returncode == 2
    assert "cannot create the directory of 'corpus.bin/x'" in under_file.stderr
