"""Training-loop equivalences and failure handling, in process and in subprocesses."""

import glob
import os
import signal

import numpy as np
import pytest
from run_util import REPO_ROOT, read_metrics, run_pretrain, train_records

from fleetlm.arguments import parse_arguments
from fleetlm.parallel.topology import init_topology
from fleetlm.pretrain import build_datasets, build_trainer
from fleetlm.trainer.trainer import NonFiniteLossError
from fleetlm.validate import plan_run

KILLING_RUN = os.path.join(REPO_ROOT, "tests", "scripts", "killing_run.py")


def common_args(tokens, output_dir, *extra):
    return [
        "--input_dir", tokens, "--split", "95,5", "--max_seq_length", "32", "--learning_rate", "3e-3",
        "--warmup_steps", "2", "--logging_steps", "1", "--max_grad_norm", "0.5", "--weight_decay", "0.1",
        "--output_dir", output_dir, "--disable_tqdm", "true", "--seed", "7", *extra,
    ]


def train_in_process(argv):
    args = parse_arguments(argv)
    plan = plan_run(args, world_size=1)
    topology = init_topology(plan.layout, args.training.seed)
    datasets = build_datasets(args, plan, topology)
    trainer = build_trainer(args, plan, topology, *datasets)
    trainer.train()
    return trainer


def test_accumulation_equals_larger_batch(pattern_tokens, tmp_path):
    big = train_in_process(common_args(pattern_tokens, str(tmp_path / "big"), "--max_steps", "4",
                                       "--per_device_train_batch_size", "4", "--save_steps", "0"))
    accumulated = train_in_process(common_args(pattern_tokens, str(tmp_path / "acc"), "--max_steps", "4",
                                               "--per_device_train_batch_size", "1",
                                               "--gradient_accumulation_steps", "4", "--save_steps", "0"))
    big_losses = [r["loss"] for r in train_records(str(tmp_path / "big"))]
    acc_losses = [r["loss"] for r in train_records(str(tmp_path / "acc"))]
    np.testing.assert_allclose(acc_losses, big_losses, rtol=1e-5)
    for name, value in big.model.state_dict().items():
        actual = accumulated.model.state_dict()[name].numpy()
        difference = np.linalg.norm(actual - value.numpy()) / np.linalg.norm(value.numpy())
        assert difference <= 1e-5, f"{name}: relative difference {difference:.2e}"


def test_non_finite_loss_stops_before_update(pattern_tokens, tmp_path):
    args = parse_arguments(common_args(pattern_tokens, str(tmp_path), "--max_steps", "5", "--save_steps", "0"))
    plan = plan_run(args, world_size=1)
    topology = init_topology(plan.layout, args.training.seed)
    trainer = build_trainer(args, plan, topology, *build_datasets(args, plan, topology))
    trainer.args.max_steps = 3
    trainer.train()  # 3 healthy steps
    before = {k: v.numpy().copy() for k, v in trainer.model.state_dict().items()}

    original_forward = trainer.engine.forward
    trainer.engine.forward = lambda input_ids, labels=None: original_forward(input_ids, labels) * float("nan")
    trainer.args.max_steps = 5
    with pytest.raises(NonFiniteLossError, match="loss is nan at step 4; the weights were not updated"):
        trainer.train()
    for name, value in trainer.model.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), before[name], err_msg=name)


def test_save_total_limit_keeps_newest(pattern_tokens, tmp_path):
    train_in_process(common_args(pattern_tokens, str(tmp_path), "--max_steps", "5", "--save_steps", "1",
                                 "--save_total_limit", "2"))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-4", "checkpoint-5", "metrics.jsonl"]


def run_args(tokens, output_dir, *extra):
    return common_args(tokens, output_dir, "--max_steps", "8", "--save_steps", "3", "--per_device_train_batch_size",
                       "2", "--gradient_accumulation_steps", "2", "--do_eval", "true", "--eval_steps", "4",
                       "--eval_iters", "1", *extra)


@pytest.fixture(scope="module")
def uninterrupted(pattern_tokens, tmp_path_factory):
    output_dir = str(tmp_path_factory.mktemp("uninterrupted"))
    result = run_pretrain(run_args(pattern_tokens, output_dir))
    assert result.returncode == 0, result.stdout[-5000:]
    return output_dir


def assert_same_records(resumed_dir, reference_dir):
    keys = ("step", "loss", "grad_norm", "lr", "consumed_samples")
    resumed = [{k: r[k] for k in keys} for r in train_records(resumed_dir)]
    reference = [{k: r[k] for k in keys} for r in train_records(reference_dir)]
    assert resumed == reference  # bitwise: floats compare exactly


@pytest.mark.parametrize("mode, at_step, expected_resume", [("after_step", 5, 3), ("during_save", 6, 3)])
def test_resume_after_sigkill_is_bitwise(pattern_tokens, tmp_path, uninterrupted, mode, at_step, expected_resume):
    output_dir = str(tmp_path)
    killed = run_pretrain(run_args(pattern_tokens, output_dir), script=KILLING_RUN, script_args=[mode, str(at_step)])
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:]
    names = sorted(os.listdir(output_dir))
    assert f"checkpoint-{expected_resume}" in names
    assert f"checkpoint-{at_step}" not in names

    resumed = run_pretrain(run_args(pattern_tokens, output_dir, "--resume_from_checkpoint", "true"))
    assert resumed.returncode == 0, resumed.stdout[-5000:]
    assert f"resumed from {os.path.join(output_dir, f'checkpoint-{expected_resume}')}" in resumed.stdout
    assert not any(name.endswith(".tmp") for name in os.listdir(output_dir))
    assert_same_records(output_dir, uninterrupted)
    eval_losses = [r for r in train_records(output_dir)]
    assert eval_losses


def test_restart_without_resume_rejected(pattern_tokens, uninterrupted):
    result = run_pretrain(run_args(pattern_tokens, uninterrupted))
    assert result.returncode == 2
    assert "already contains checkpoint-8" in result.stdout


def test_sharding_in_one_process_is_plain_training(pattern_tokens, tmp_path):
    plain = train_in_process(common_args(pattern_tokens, str(tmp_path / "plain"), "--max_steps", "2", "--save_steps", "0"))
    sharded = train_in_process(common_args(pattern_tokens, str(tmp_path / "sharded"), "--max_steps", "2",
                                           "--save_steps", "0", "--sharding", "stage2"))
    assert sharded.parallel.sharding_stage == 0
    plain_losses = [r["loss"] for r in train_records(str(tmp_path / "plain"))]
    sharded_losses = [r["loss"] for r in train_records(str(tmp_path / "sharded"))]
    assert sharded_losses == plain_losses
    assert plain.parallel.sharding_stage == 0


def test_resume_with_smaller_batch_and_longer_schedule(pattern_tokens, tmp_path):
    output_dir = str(tmp_path)
    first = run_pretrain(common_args(pattern_tokens, output_dir, "--max_steps", "3", "--save_steps", "3",
                                     "--per_device_train_batch_size", "4"))
    assert first.returncode == 0, first.stdout[-3000:]
    # Half the global batch and twice the steps: the train set must cover the samples already
    # consumed plus the new steps, and the first resumed step uses the new schedule's rate.
    resumed = run_pretrain(common_args(pattern_tokens, output_dir, "--max_steps", "6", "--save_steps", "0",
                                       "--per_device_train_batch_size", "2", "--resume_from_checkpoint", "true"))
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    records = train_records(output_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r["consumed_samples"] for r in records[3:]] == [14, 16, 18]

    fresh_dir = str(tmp_path / "fresh")
    fresh = run_pretrain(common_args(pattern_tokens, fresh_dir, "--max_steps", "6", "--save_steps", "0",
                                     "--per_device_train_batch_size", "2"))
    assert fresh.returncode == 0, fresh.stdout[-3000:]
    assert records[3]["lr"] == train_records(fresh_dir)[3]["lr"]


def test_resume_rejects_other_architecture_and_finished_run(pattern_tokens, uninterrupted):
    wider = run_pretrain(run_args(pattern_tokens, uninterrupted, "--resume_from_checkpoint", "true",
                                  "--max_steps", "12", "--hidden_size", "128"))
    assert wider.returncode == 2
    errors = [line for line in wider.stdout.splitlines() if "cannot be resumed" in line]
    assert len(errors) == 1, wider.stdout[-3000:]
    assert "because the model architecture differs from the checkpoint's (hidden_size: saved 64, requested 128)" \
        in errors[0]
    assert "layout" not in errors[0]
    # Started again after it finished (a retried job): nothing to do, which is success.
    finished = run_pretrain(run_args(pattern_tokens, uninterrupted, "--resume_from_checkpoint", "true"))
    assert finished.returncode == 0, finished.stdout[-3000:]
    assert "checkpoint-8 is at max_steps=8: the run in" in finished.stdout
    assert "is complete and there is nothing to train" in finished.stdout
    assert "step 1/" not in finished.stdout
    # A checkpoint named explicitly, or one beyond max_steps, is a mistake.
    explicit = run_pretrain(run_args(pattern_tokens, uninterrupted, "--resume_from_checkpoint",
                                     os.path.join(uninterrupted, "checkpoint-8")))
    assert explicit.returncode == 2
    assert "is at step 8, and max_steps=8 leaves nothing to train" in explicit.stdout
    shorter = run_pretrain(run_args(pattern_tokens, uninterrupted, "--resume_from_checkpoint", "true",
                                    "--max_steps", "6"))
    assert shorter.returncode == 2
    assert "is at step 8, and max_steps=6 leaves nothing to train" in shorter.stdout


def test_token_ids_beyond_vocab_rejected_before_training(pattern_tokens, tmp_path):
    result = run_pretrain(common_args(pattern_tokens, str(tmp_path / "out"), "--max_steps", "2",
                                      "--vocab_size", "256"))
    assert result.returncode == 2
    assert "contains token id 511, but the model's vocab_size is 256" in result.stdout
    assert not (tmp_path / "out").exists()


def test_damaged_checkpoint_rejected_with_path(pattern_tokens, uninterrupted, tmp_path):
    import shutil

    damaged = tmp_path / "checkpoint-6"
    shutil.copytree(os.path.join(uninterrupted, "checkpoint-6"), damaged)
    optimizer_files = [name for name in os.listdir(damaged) if name.startswith("optimizer")]
    assert optimizer_files
    for name in optimizer_files:
        (damaged / name).write_bytes(b"\x80\x04truncated")
    result = run_pretrain(run_args(pattern_tokens, str(tmp_path / "out"), "--resume_from_checkpoint", str(damaged)))
    assert result.returncode == 2
    assert f"cannot load checkpoint {damaged}" in result.stdout
    assert "Traceback" not in result.stdout

    state = damaged / "trainer_state.json"
    state.write_text(state.read_text().replace('"step": 6', '"step": "6"'))
    result = run_pretrain(run_args(pattern_tokens, str(tmp_path / "out"), "--resume_from_checkpoint", str(damaged)))
    assert result.returncode == 2
    assert "has step='6', not a non-negative integer" in result.stdout


def copy_checkpoints(source_dir, target_dir):
    import shutil

    for name in os.listdir(source_dir):
        if name.startswith("checkpoint-"):
            shutil.copytree(os.path.join(source_dir, name), os.path.join(target_dir, name))


def truncate_optimizer_files(checkpoint):
    names = [name for name in os.listdir(checkpoint) if name.startswith("optimizer")]
    assert names
    for name in names:
        with open(os.path.join(checkpoint, name), "r+b") as f:
            f.truncate(100)
    return names


def test_resume_true_skips_damaged_checkpoint(pattern_tokens, uninterrupted, tmp_path):
    output_dir = str(tmp_path)
    copy_checkpoints(uninterrupted, output_dir)
    damaged = os.path.join(output_dir, "checkpoint-8")
    names = truncate_optimizer_files(damaged)
    result = run_pretrain(run_args(pattern_tokens, output_dir, "--resume_from_checkpoint", "true", "--max_steps", "10"))
    assert result.returncode == 0, result.stdout[-5000:]
    warnings = [line for line in result.stdout.splitlines() if "skipping damaged checkpoint" in line]
    assert len(warnings) == 1
    assert f"skipping damaged checkpoint {damaged} ({names[0]}: 100 bytes, but " in warnings[0]
    assert f"resuming from {os.path.join(output_dir, 'checkpoint-6')} instead" in warnings[0]
    assert f"resumed from {os.path.join(output_dir, 'checkpoint-6')}: step 6" in result.stdout
    # The damaged checkpoint is set aside under another name, not deleted; steps 7-10 were trained from step 6.
    assert not os.path.exists(damaged)
    assert len(glob.glob(damaged + ".abandoned-*")) == 1
    assert [r["step"] for r in train_records(output_dir)] == [7, 8, 9, 10]


def test_resume_true_with_every_checkpoint_damaged(pattern_tokens, uninterrupted, tmp_path):
    output_dir = str(tmp_path)
    copy_checkpoints(uninterrupted, output_dir)
    for name in ("checkpoint-3", "checkpoint-6", "checkpoint-8"):
        truncate_optimizer_files(os.path.join(output_dir, name))
    result = run_pretrain(run_args(pattern_tokens, output_dir, "--resume_from_checkpoint", "true", "--max_steps", "10"))
    assert result.returncode == 2
    assert f"every complete checkpoint in {output_dir} is damaged" in result.stdout
    assert "Traceback" not in result.stdout


def test_explicit_damaged_checkpoint_does_not_fall_back(pattern_tokens, uninterrupted, tmp_path):
    output_dir = str(tmp_path)
    copy_checkpoints(uninterrupted, output_dir)
    damaged = os.path.join(output_dir, "checkpoint-8")
    names = truncate_optimizer_files(damaged)
    result = run_pretrain(run_args(pattern_tokens, output_dir, "--resume_from_checkpoint", damaged, "--max_steps", "10"))
    assert result.returncode == 2
    assert f"cannot load checkpoint {damaged}: {names[0]} is damaged" in result.stdout
    assert "resumed from" not in result.stdout


def test_missing_file_found_by_size_check(uninterrupted, tmp_path):
    from fleetlm.trainer import checkpoint as ckpt

    copy_checkpoints(uninterrupted, str(tmp_path))
    checkpoint = str(tmp_path / "checkpoint-8")
    ckpt.verify_file_sizes(checkpoint)
    os.remove(os.path.join(checkpoint, "rng_state_rank0.pkl"))
    with pytest.raises(ckpt.DamagedCheckpointError, match="rng_state_rank0.pkl is damaged .FileNotFoundError"):
        ckpt.verify_file_sizes(checkpoint)


def test_saved_state_lists_every_file(uninterrupted):
    import json

    from fleetlm.trainer import checkpoint as ckpt

    checkpoint = os.path.join(uninterrupted, "checkpoint-8")
    with open(os.path.join(checkpoint, ckpt.TRAINER_STATE)) as f:
        state = json.load(f)
    assert state["format_version"] == 2
    listed = sorted(state["files"])
    assert listed == sorted(name for name in os.listdir(checkpoint) if name != ckpt.TRAINER_STATE)
    assert "config.json" in listed


@pytest.mark.parametrize("damage", ["truncate", "remove"])
def test_resume_true_skips_checkpoint_with_damaged_config(pattern_tokens, uninterrupted, tmp_path, damage):
    output_dir = str(tmp_path)
    copy_checkpoints(uninterrupted, output_dir)
    damaged = os.path.join(output_dir, "checkpoint-8")
    config = os.path.join(damaged, "config.json")
    if damage == "truncate":
        with open(config, "r+b") as f:
            f.truncate(10)
    else:
        os.remove(config)
    result = run_pretrain(run_args(pattern_tokens, output_dir, "--resume_from_checkpoint", "true", "--max_steps", "10"))
    assert result.returncode == 0, result.stdout[-5000:]
    assert f"skipping damaged checkpoint {damaged} (config.json: " in result.stdout
    assert f"resumed from {os.path.join(output_dir, 'checkpoint-6')}: step 6" in result.stdout

    [damaged] = glob.glob(damaged + ".abandoned-*")  # set aside by the resume from step 6
    explicit = run_pretrain(run_args(pattern_tokens, str(tmp_path / "explicit"), "--resume_from_checkpoint", damaged,
                                     "--max_steps", "10"))
    assert explicit.returncode == 2
    assert f"cannot load checkpoint {damaged}: config.json is damaged" in explicit.stdout
    assert "--resume_from_checkpoint true, which skips damaged checkpoints" in explicit.stdout
    assert "Traceback" not in explicit.stdout


def test_resume_true_skips_checkpoint_with_edited_step(pattern_tokens, uninterrupted, tmp_path):
    from fleetlm.trainer import checkpoint as ckpt

    output_dir = str(tmp_path)
    copy_checkpoints(uninterrupted, output_dir)
    state = tmp_path / "checkpoint-8" / ckpt.TRAINER_STATE
    state.write_text(state.read_text().replace('"step": 8', '"step": 4'))
    result = run_pretrain(run_args(pattern_tokens, output_dir, "--resume_from_checkpoint", "true", "--max_steps", "10"))
    assert result.returncode == 0, result.stdout[-5000:]
    assert "(trainer_state.json: it has step=4, but the directory name says step 8)" in result.stdout
    assert f"resumed from {os.path.join(output_dir, 'checkpoint-6')}: step 6" in result.stdout


def test_pipeline_evaluates_with_larger_eval_batch(pattern_tokens, tmp_path):
    # Paddle's pipeline engine keeps the activation shape of its first pass (training micro-batch 1)
    # for the stage-to-stage buffers unless it is cleared, which an eval batch of 2 would overrun.
    # The pp2 run must match one process step for step, evaluations included.
    argv = ["--max_steps", "2", "--save_steps", "0", "--per_device_train_batch_size", "1",
            "--per_device_eval_batch_size", "2", "--gradient_accumulation_steps", "2", "--do_eval", "true",
            "--eval_steps", "1", "--eval_iters", "2"]
    single_dir, pipeline_dir = str(tmp_path / "single"), str(tmp_path / "pp2")
    single = run_pretrain(common_args(pattern_tokens, single_dir, *argv))
    assert single.returncode == 0, single.stdout[-3000:]
    pipeline = run_pretrain(common_args(pattern_tokens, pipeline_dir, *argv, "--pipeline_parallel_degree", "2"),
                            nproc=2, log_dir=str(tmp_path / "log"))
    assert pipeline.returncode == 0, pipeline.logs

    def losses(output_dir, key):
        return [r[key] for r in read_metrics(output_dir) if key in r]

    for key in ("eval_loss", "loss"):
        expected = losses(single_dir, key)
        assert len(expected) == 2
        np.testing.assert_allclose(losses(pipeline_dir, key), expected, rtol=1e-5, err_msg=key)


def test_rotation_keeps_checkpoint_just_saved(tmp_path):
    from fleetlm.trainer import checkpoint as ckpt

    # checkpoint-8 was skipped as damaged; the resumed run has saved checkpoint-4 after checkpoint-3.
    for step in (3, 4, 8):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / ckpt.TRAINER_STATE).write_text("{}")
    ckpt._rotate(str(tmp_path), keep=1, saved_step=4)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-4", "checkpoint-8"]


def test_ranks_that_disagree_on_resume_stop(pattern_tokens, uninterrupted, tmp_path):
    output_dir = str(tmp_path / "out")
    os.makedirs(output_dir)
    copy_checkpoints(uninterrupted, output_dir)
    script = os.path.join(REPO_ROOT, "tests", "trainer", "rank_damage_run.py")
    result = run_pretrain(run_args(pattern_tokens, output_dir, "--resume_from_checkpoint", "true", "--max_steps", "10"),
                          nproc=2, log_dir=str(tmp_path / "log"), script=script, script_args=["1", "checkpoint-8"])
    assert result.returncode == 2, result.logs
    assert "ranks chose checkpoints of different steps to resume from (rank 0: 8, rank 1: 6)" in result.logs
    assert not os.path.isdir(os.path.join(output_dir, "checkpoint-9"))
