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
        for resume in (["--resume_from_checkpoint", "true"], []):
            second = run_pretrain(args_for(pattern_tokens, output_dir, "--max_steps", "4", *resume))
            assert second.returncode == 2
            # The lock is named first, before anything about the directory's contents.
            errors = [line for line in second.stdout.splitlines() if "ERROR" in line]
            assert len(errors) == 1, second.stdout[-3000:]
            assert f"output_dir='{output_dir}' is in use by another run (pid {first.pid} on " in errors[0]
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
    names = sorted(n for n in os.listdir(output_dir) if n.startswith("checkpoint-"))
    assert len(names) == 3, names
    assert names[0] == "checkpoint-3"
    # One suffix for the abandoned branch: checkpoint-3.abandoned-TIME and checkpoint-4.abandoned-TIME.
    suffixes = {name.split(".", 1)[1] for name in names[1:]}
    assert len(suffixes) == 1, names
    assert suffixes.pop().startswith("abandoned-")
    assert [n.split(".")[0] for n in names[1:]] == ["checkpoint-3", "checkpoint-4"]
    assert f"{names[1]}, {names[2]}" in branch.stdout
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
    # Both schedules start their decay at step 3 at the peak rate, so the first step that differs is 4.
    assert "another learning-rate schedule (max_steps: saved 4, now 40): step 4 runs at" in warnings[1]
    assert "(the rates agree until then)" in warnings[1]
    # The rate the warning names is the one step 4 used.
    step4 = [r for r in read_metrics(output_dir) if r.get("step") == 4 and "lr" in r][-1]
    assert f"step 4 runs at {step4['lr']:.3e}" in warnings[1]


@pytest.mark.parametrize("changed, expected", [
    ({}, []),
    # decay_steps fixed: a longer run keeps the schedule, so no warning.
    ({"max_steps": 200}, []),
    ({"split": "8,2"}, ["split: saved '9,1', now '8,2'"]),
    # The same data written another way.
    ({"split": "90,10,0"}, []),
    ({"input_dir": "./data/a"}, []),
    ({"input_dir": os.path.abspath("data/a")}, []),
    ({"decay_steps": 50}, ["decay_steps: saved 100, now 50"]),
    # Cosine and linear agree at the midpoint of the decay (0-based step 55) and differ after it.
    ({"lr_scheduler_type": "linear"}, ["step 57 runs at", "(the rates agree until then)"]),
])
def test_resume_change_warnings_unit(changed, expected):
    saved = {"input_dir": "data/a", "split": "9,1", "max_seq_length": 64, "seed": 1, "learning_rate": 1e-3,
             "min_learning_rate": 1e-4, "lr_scheduler_type": "cosine", "warmup_steps": 10, "warmup_ratio": 0.0,
             "decay_steps": 100, "max_steps": 100}
    step = 55 if changed.get("lr_scheduler_type") else 20
    warnings = resume_change_warnings("ckpt", saved, dict(saved, **changed), step, 80)
    assert len(warnings) == min(len(expected), 1)
    for fragment in expected:
        assert fragment in warnings[0]


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


def test_foreign_checkpoint_into_used_output_dir(pattern_tokens, tmp_path):
    source, used = str(tmp_path / "source"), str(tmp_path / "used")
    for output_dir, seed in ((source, "7"), (used, "5")):
        run = run_pretrain(args_for(pattern_tokens, output_dir, "--max_steps", "4", "--save_steps", "2", "--seed", seed))
        assert run.returncode == 0, run.stdout[-3000:]
    before = sorted(os.listdir(used))
    mixed = run_pretrain(args_for(pattern_tokens, used, "--max_steps", "6", "--save_steps", "2",
                                  "--resume_from_checkpoint", os.path.join(source, "checkpoint-2")))
    assert mixed.returncode == 2
    assert f"is outside output_dir='{used}', which contains checkpoints of another run (checkpoint-2, checkpoint-4)" \
        in mixed.stdout
    assert sorted(os.listdir(used)) == before
    fresh = run_pretrain(args_for(pattern_tokens, str(tmp_path / "fresh"), "--max_steps", "3", "--save_steps", "0",
                                  "--resume_from_checkpoint", os.path.join(source, "checkpoint-2")))
    assert fresh.returncode == 0, fresh.stdout[-3000:]


@pytest.mark.parametrize("kind", ["symlink", "directory", "dangling"])
def test_unusable_lock_path_refused_without_touching_target(pattern_tokens, tmp_path, kind):
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    lock = output_dir / ".fleetlm.lock"
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    if kind == "symlink":
        lock.symlink_to(precious)
    elif kind == "directory":
        lock.mkdir()
    else:
        lock.symlink_to(tmp_path / "missing")
    result = run_pretrain(args_for(pattern_tokens, str(output_dir), "--max_steps", "2", "--save_steps", "0"))
    assert result.returncode == 2
    assert f"cannot use the lock file {lock} (" in result.stdout
    assert "Traceback" not in result.stdout
    assert precious.read_text() == "keep me"
