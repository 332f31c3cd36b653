"""Resume and output_dir safety: one run per output_dir, abandoned checkpoints set aside, changed arguments named."""

import os
import signal
import subprocess
import sys
import time

import pytest
from run_util import REPO_ROOT, RUN_PRETRAIN, _env, read_metrics, run_pretrain, train_records

from fleetlm.trainer.resume_changes import resume_change_warnings

KILLING_RUN = os.path.join(REPO_ROOT, "tests", "scripts", "killing_run.py")


DEFAULTS = {"--split": "95,5", "--max_seq_length": "32", "--learning_rate": "3e-3", "--warmup_steps": "2",
            "--logging_steps": "1", "--per_device_train_batch_size": "2", "--disable_tqdm": "true", "--seed": "7",
            "--do_eval": "false"}


def args_for(tokens, output_dir, *extra):
    """Arguments of a tiny run; ``extra`` flag-value pairs replace the defaults (a flag may appear only once)."""
    options = dict(DEFAULTS, **{"--input_dir": tokens, "--output_dir": output_dir})
    options.update(zip(extra[0::2], extra[1::2]))
    return [item for pair in options.items() for item in pair]


def test_second_run_in_same_output_dir_stops(pattern_tokens, tmp_path):
    output_dir = str(tmp_path / "out")
    first = subprocess.Popen([sys.executable, RUN_PRETRAIN, *args_for(pattern_tokens, output_dir, "--max_steps", "100000",
                                                                      "--save_steps", "0")],
                             env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    try:
        lock = os.path.join(output_dir, ".fleetlm.lock")
        deadline = time.monotonic() + 120
        while not (os.path.exists(lock) and os.path.getsize(lock) > 0):
            assert first.poll() is None, first.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "the first run did not take the lock within 120 s"
            time.sleep(0.2)
        second = run_pretrain(args_for(pattern_tokens, output_dir, "--max_steps", "4", "--resume_from_checkpoint", "true"))
        assert second.returncode == 2
        assert f"output_dir='{output_dir}' is in use by another run (pid {first.pid} on " in second.stdout
        assert "step 1/" not in second.stdout
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.communicate()
    # SIGKILL ends the first run without releasing anything by hand; the kernel drops the lock.
    third = run_pretrain(args_for(pattern_tokens, output_dir, "--max_steps", "2", "--save_steps", "0",
                                  "--resume_from_checkpoint", "true"))
    assert third.returncode == 0, third.stdout[-3000:]


def test_resume_from_older_checkpoint_sets_newer_ones_aside(pattern_tokens, tmp_path):
    output_dir = str(tmp_path)
    first = run_pretrain(args_for(pattern_tokens, output_dir, "--max_steps", "4", "--save_steps", "1"))
    assert first.returncode == 0, first.stdout[-3000:]
    os.remove(os.path.join(output_dir, "checkpoint-3", "trainer_state.json"))  # an incomplete copy, also newer

    branch = run_pretrain(args_for(pattern_tokens, output_dir, "--max_steps", "3", "--save_steps", "1",
                                   "--save_total_limit", "1", "--learning_rate", "1e-2",
                                   "--resume_from_checkpoint", os.path.join(output_dir, "checkpoint-2")))
    assert branch.returncode == 0, branch.stdout[-3000:]
    assert "so the newer checkpoints of the run that went on from there were renamed" in branch.stdout
    assert "checkpoint-3.abandoned, checkpoint-4.abandoned" in branch.stdout
    names = sorted(os.listdir(output_dir))
    assert [n for n in names if n.startswith("checkpoint-")] == [
        "checkpoint-3", "checkpoint-3.abandoned", "checkpoint-4.abandoned"]
    assert [r["step"] for r in train_records(output_dir)] == [1, 2, 3]

    # A later resume continues this run, not the abandoned one.
    again = run_pretrain(args_for(pattern_tokens, output_dir, "--max_steps", "5", "--save_steps", "1",
                                  "--save_total_limit", "1", "--learning_rate", "1e-2", "--resume_from_checkpoint", "true"))
    assert again.returncode == 0, again.stdout[-3000:]
    assert f"resumed from {os.path.join(output_dir, 'checkpoint-3')}" in again.stdout
    assert [r["step"] for r in train_records(output_dir)] == [1, 2, 3, 4, 5]


def test_checkpoint_without_trainer_state(pattern_tokens, tmp_path):
    output_dir = str(tmp_path)
    first = run_pretrain(args_for(pattern_tokens, output_dir, "--max_steps", "3", "--save_steps", "1"))
    assert first.returncode == 0, first.stdout[-3000:]
    os.remove(os.path.join(output_dir, "checkpoint-3", "trainer_state.json"))
    explicit = run_pretrain(args_for(pattern_tokens, output_dir, "--max_steps", "4", "--resume_from_checkpoint",
                                     os.path.join(output_dir, "checkpoint-3")))
    assert explicit.returncode == 2
    assert "checkpoint-3' has no trainer_state.json, which every complete checkpoint has" in explicit.stdout
    automatic = run_pretrain(args_for(pattern_tokens, output_dir, "--max_steps", "4", "--resume_from_checkpoint", "true"))
    assert automatic.returncode == 0, automatic.stdout[-3000:]
    assert "checkpoint-3, which has no trainer_state.json (deleted, or an incomplete copy)" in automatic.stdout
    assert f"resumed from {os.path.join(output_dir, 'checkpoint-2')}" in automatic.stdout


def test_changed_data_and_schedule_named_on_resume(pattern_tokens, tmp_path):
    output_dir = str(tmp_path)
    first = run_pretrain(args_for(pattern_tokens, output_dir, "--max_steps", "4", "--save_steps", "2"))
    assert first.returncode == 0, first.stdout[-3000:]
    resumed = run_pretrain(args_for(pattern_tokens, output_dir, "--max_steps", "40", "--save_steps", "0", "--seed", "8",
                                    "--resume_from_checkpoint", os.path.join(output_dir, "checkpoint-2")))
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    warnings = [line for line in resumed.stdout.splitlines() if "WARNING" in line and "resuming" in line]
    assert len(warnings) == 2, resumed.stdout[-3000:]
    assert "other data arguments than it was saved with (seed: saved 7, now 8)" in warnings[0]
    assert "consumed 4 samples of the saved sample order" in warnings[0]
    assert "another learning-rate schedule (max_steps: saved 4, now 40): step 3 runs at" in warnings[1]
    # The rate the warning names is the one step 3 used.
    step3 = [r for r in read_metrics(output_dir) if r.get("step") == 3 and "lr" in r][-1]
    assert f"step 3 runs at {step3['lr']:.3e}" in warnings[1]


@pytest.mark.parametrize("changed, expected", [
    ({}, []),
    # decay_steps fixed: a longer run keeps the schedule, so no warning.
    ({"max_steps": 200}, []),
    ({"split": "8,2"}, ["split: saved '9,1', now '8,2'"]),
    ({"decay_steps": 50}, ["decay_steps: saved 100, now 50"]),
])
def test_resume_change_warnings_unit(changed, expected):
    saved = {"input_dir": "data/a", "split": "9,1", "max_seq_length": 64, "seed": 1, "learning_rate": 1e-3,
             "min_learning_rate": 1e-4, "lr_scheduler_type": "cosine", "warmup_steps": 10, "warmup_ratio": 0.0,
             "decay_steps": 100, "max_steps": 100}
    warnings = resume_change_warnings("ckpt", saved, dict(saved, **changed), 20, 80)
    assert len(warnings) == len(expected)
    for warning, fragment in zip(warnings, expected):
        assert fragment in warning


def test_surviving_rank_names_lost_peer_and_checkpoint(pattern_tokens, tmp_path):
    output_dir = str(tmp_path / "out")
    killed = run_pretrain(args_for(pattern_tokens, output_dir, "--max_steps", "50", "--save_steps", "2"), nproc=2,
                          log_dir=str(tmp_path / "log"), script=KILLING_RUN, script_args=["rank1_after_step", "3"])
    assert killed.returncode != 0
    with open(tmp_path / "log" / "workerlog.0") as f:
        rank0 = f.read()
    lines = [line for line in rank0.splitlines() if "a collective operation failed" in line]
    assert len(lines) == 1, rank0[-3000:]
    assert "another process of the job has most likely stopped" in lines[0]
    assert f"The latest complete checkpoint is {os.path.join(output_dir, 'checkpoint-2')} (step 2)" in lines[0]
    assert "Traceback" not in rank0
