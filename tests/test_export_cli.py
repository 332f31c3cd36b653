"""``python -m fleetlm.export``: what it rejects, what it replaces, and the weights it reads.

One 2-step run of the tiny LLaMA on one process saves checkpoint-2, which the module shares. Each
test that damages it or writes next to it works on its own copy. The export of the intact checkpoint
is the reference that every successful export must equal exactly.
"""

import json
import logging
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import paddle
import pytest
from run_util import REPO_ROOT, _env, describe, run_pretrain

from fleetlm.arguments import ConfigError
from fleetlm.export import export_checkpoint, main as export_main
from fleetlm.models.weights import read_safetensors, read_weights


def run_args(tokens, output_dir):
    return [
        "--input_dir", tokens, "--split", "95,5", "--max_seq_length", "32", "--learning_rate", "3e-3",
        "--warmup_steps", "2", "--per_device_train_batch_size", "2", "--max_steps", "2", "--save_steps", "2",
        "--do_eval", "false", "--disable_tqdm", "true", "--seed", "7", "--output_dir", output_dir,
    ]


@pytest.fixture(scope="module")
def trained_run(pattern_tokens, tmp_path_factory):
    """The output_dir of a finished 2-step run, holding checkpoint-2. Tests must not change it."""
    output_dir = str(tmp_path_factory.mktemp("export_cli") / "run")
    result = run_pretrain(run_args(pattern_tokens, output_dir))
    assert result.returncode == 0, describe(result)
    return output_dir


@pytest.fixture(scope="module")
def reference(trained_run, tmp_path_factory):
    """(export directory, tensors) of the intact checkpoint-2."""
    out_dir = str(tmp_path_factory.mktemp("reference") / "hf")
    assert export_main([os.path.join(trained_run, "checkpoint-2"), out_dir]) == 0
    return out_dir, read_safetensors(os.path.join(out_dir, "model.safetensors"))


@pytest.fixture
def run_copy(trained_run, tmp_path):
    """A copy of the run's output_dir that the test may damage."""
    return shutil.copytree(trained_run, str(tmp_path / "run"))


@pytest.fixture
def export_log(caplog):
    """caplog, receiving the fleetlm loggers' records (they do not propagate to the root logger)."""
    logger = logging.getLogger("fleetlm")
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)


def messages(log, level):
    return [record.getMessage() for record in log.records if record.levelno == level]


def snapshot(directory):
    """{relative path: bytes} of every file under ``directory``."""
    files = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, directory)] = f.read()
    return files


def assert_tensors_equal(actual, expected):
    assert sorted(actual) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(actual[name], value, err_msg=name)


# ---- OUT_DIR that would damage a checkpoint ----

# case: (OUT_DIR relative to the run's output_dir, text the error must contain)
CHECKPOINT_OUT_DIRS = {
    "checkpoint itself": ("checkpoint-2", "is the checkpoint being exported"),
    "inside checkpoint": ("checkpoint-2/hf", "is inside the fleetlm checkpoint"),
    "run output_dir": (".", "is a run's output_dir"),
    "checkpoint name in output_dir": ("checkpoint-9", "has the name of a checkpoint"),
}


@pytest.mark.parametrize("case", CHECKPOINT_OUT_DIRS)
def test_out_dir_at_checkpoint_rejected(run_copy, export_log, case):
    relative, expected = CHECKPOINT_OUT_DIRS[case]
    out_dir = os.path.normpath(os.path.join(run_copy, relative))
    before = snapshot(run_copy)

    assert export_main([os.path.join(run_copy, "checkpoint-2"), out_dir]) == 2

    errors = messages(export_log, logging.ERROR)
    assert len(errors) == 1
    assert f"OUT_DIR '{out_dir}' {expected}" in errors[0]
    assert "pass a new directory" in errors[0] or "pass another name" in errors[0]
    assert snapshot(run_copy) == before


def test_output_dir_of_run_without_checkpoint_rejected(run_copy, tmp_path, export_log):
    # A run before its first save (or one that saves none) has only its lock and metrics.jsonl.
    out_dir = tmp_path / "running"
    out_dir.mkdir()
    (out_dir / ".fleetlm.lock").write_text("pid 1 on host\n")
    assert export_main([os.path.join(run_copy, "checkpoint-2"), str(out_dir)]) == 2
    assert "is a run's output_dir" in messages(export_log, logging.ERROR)[0]
    assert sorted(os.listdir(out_dir)) == [".fleetlm.lock"]


def test_out_dir_beside_checkpoint_accepted(run_copy, reference):
    out_dir = os.path.join(run_copy, "checkpoint-2-hf")
    assert export_main([os.path.join(run_copy, "checkpoint-2"), out_dir]) == 0
    assert_tensors_equal(read_safetensors(os.path.join(out_dir, "model.safetensors")), reference[1])


def test_overwrite_spares_checkpoint_files(run_copy, tmp_path, export_log):
    # A checkpoint whose trainer_state.json was lost is still a checkpoint, so --overwrite must not touch it.
    other = shutil.copytree(os.path.join(run_copy, "checkpoint-2"), str(tmp_path / "other"))
    os.remove(os.path.join(other, "trainer_state.json"))
    before = snapshot(other)

    assert export_main([os.path.join(run_copy, "checkpoint-2"), other, "--overwrite"]) == 2

    assert "contains fleetlm checkpoint files" in messages(export_log, logging.ERROR)[0]
    assert snapshot(other) == before


# ---- OUT_DIR with weights of another model ----


STALE_SHARDS = ("model-00001-of-00002.safetensors", "older-run-part2.safetensors")


def write_stale_export(out_dir, reference_tensors):
    """Write a sharded Hugging Face export of zeroed weights into ``out_dir``, plus an unrelated file.

    The second shard has a name of its own, which only the index file lists.
    """
    from safetensors.numpy import save_file

    os.makedirs(out_dir)
    names = sorted(reference_tensors)
    weight_map = {}
    for shard, part in ((STALE_SHARDS[0], names[::2]), (STALE_SHARDS[1], names[1::2])):
        save_file({name: np.zeros_like(reference_tensors[name]) for name in part}, os.path.join(out_dir, shard),
                  metadata={"format": "pt"})
        weight_map.update({name: shard for name in part})
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, f)
    with open(os.path.join(out_dir, "pytorch_model.bin"), "wb") as f:
        f.write(b"old weights")
    with open(os.path.join(out_dir, "README.md"), "w") as f:
        f.write("notes\n")


def test_out_dir_with_weights_needs_overwrite(trained_run, reference, tmp_path, export_log):
    out_dir = str(tmp_path / "hf")
    write_stale_export(out_dir, reference[1])
    before = snapshot(out_dir)

    assert export_main([os.path.join(trained_run, "checkpoint-2"), out_dir]) == 2

    error = messages(export_log, logging.ERROR)[0]
    assert (f"OUT_DIR '{out_dir}' already contains config.json, model-00001-of-00002.safetensors, "
            "model.safetensors.index.json, older-run-part2.safetensors, pytorch_model.bin;") in error
    assert "--overwrite" in error
    assert snapshot(out_dir) == before


def test_overwrite_deletes_stale_weights(trained_run, reference, tmp_path, export_log):
    out_dir = str(tmp_path / "hf")
    write_stale_export(out_dir, reference[1])

    assert export_main([os.path.join(trained_run, "checkpoint-2"), out_dir, "--overwrite"]) == 0

    assert sorted(os.listdir(out_dir)) == ["README.md", "config.json", "model.safetensors"]
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]
    warnings = [m for m in messages(export_log, logging.WARNING) if m.startswith("--overwrite")]
    assert len(warnings) == 1
    for name in ("config.json", *STALE_SHARDS, "model.safetensors.index.json", "pytorch_model.bin"):
        assert name in warnings[0]
    # What continue_training reads from the directory is the new export, not the zeroed shards.
    tensors, source = read_weights(out_dir)
    assert source == os.path.join(out_dir, "model.safetensors")
    assert_tensors_equal(tensors, reference[1])
    with open(os.path.join(out_dir, "config.json")) as f:
        assert json.load(f) == json.load(open(os.path.join(reference[0], "config.json")))


def test_failed_write_keeps_existing_export(trained_run, reference, tmp_path, monkeypatch, export_log):
    import safetensors.numpy

    out_dir = str(tmp_path / "hf")
    write_stale_export(out_dir, reference[1])
    before = snapshot(out_dir)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.numpy, "save_file", disk_full)
    assert export_main([os.path.join(trained_run, "checkpoint-2"), out_dir, "--overwrite"]) == 2

    assert "failed to write the export" in messages(export_log, logging.ERROR)[0]
    assert snapshot(out_dir) == before
    assert sorted(os.listdir(tmp_path)) == ["hf"]


def test_out_dir_file_rejected(trained_run, tmp_path, export_log):
    a_file = tmp_path / "afile"
    a_file.write_text("keep")
    for out_dir, expected in ((str(a_file), "is a file"), (str(a_file / "sub"), "which is a file")):
        assert export_main([os.path.join(trained_run, "checkpoint-2"), out_dir]) == 2
        assert f"OUT_DIR '{out_dir}' " in messages(export_log, logging.ERROR)[-1]
        assert expected in messages(export_log, logging.ERROR)[-1]
    assert a_file.read_text() == "keep"


# ---- reading weights ----


def test_read_weights_prefers_single_file(tmp_path, export_log):
    from safetensors.numpy import save_file

    single = {"w": np.ones((2, 3), dtype=np.float32)}
    sharded = {"w": np.zeros((2, 3), dtype=np.float32)}
    save_file(sharded, str(tmp_path / "model-00001-of-00001.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "model-00001-of-00001.safetensors"}}))

    tensors, source = read_weights(str(tmp_path))
    assert source == str(tmp_path / "model.safetensors.index.json")
    np.testing.assert_array_equal(tensors["w"], sharded["w"])
    assert messages(export_log, logging.WARNING) == []

    save_file(single, str(tmp_path / "model.safetensors"))
    tensors, source = read_weights(str(tmp_path))
    assert source == str(tmp_path / "model.safetensors")
    np.testing.assert_array_equal(tensors["w"], single["w"])
    warnings = messages(export_log, logging.WARNING)
    assert len(warnings) == 1
    assert "model.safetensors and model.safetensors.index.json" in warnings[0]


def damage_truncate(path):
    with open(path, "r+b") as f:
        f.truncate(1000)


def damage_zero(path):
    size = os.path.getsize(path)
    with open(path, "wb") as f:
        f.write(bytes(size))


@pytest.mark.parametrize("damage, reason", [(damage_truncate, r"\(1000 bytes, but \d+ were saved\)"),
                                            (damage_zero, r"\(ValueError: ")])
def test_damaged_model_state_rejected(run_copy, tmp_path, export_log, damage, reason):
    checkpoint = os.path.join(run_copy, "checkpoint-2")
    damage(os.path.join(checkpoint, "model_state.pdparams"))
    out_dir = str(tmp_path / "hf")

    assert export_main([checkpoint, out_dir]) == 2

    errors = messages(export_log, logging.ERROR)
    assert len(errors) == 1
    assert errors[0].startswith(f"cannot read the weights of {checkpoint}: model_state.pdparams is damaged ")
    assert re.search(reason, errors[0])
    assert "Use another checkpoint-STEP directory" in errors[0]
    assert not os.path.exists(out_dir)


def make_tensor_parallel_checkpoint(checkpoint):
    """Rewrite a one-process checkpoint in place as the files of a tp=2 run.

    Every matrix is split in two along its columns into model_state.tp00_pp00.pdparams and
    model_state.tp01_pp00.pdparams (the per-rank format of fleetlm.trainer.sharded_checkpoint),
    vectors are replicated, and trainer_state.json lists the new files, two optimizer files and
    two RNG files, with their sizes.
    """
    state = paddle.load(os.path.join(checkpoint, "model_state.pdparams"))
    os.remove(os.path.join(checkpoint, "model_state.pdparams"))
    split_axis = {name: 1 if len(tensor.shape) == 2 else None for name, tensor in state.items()}
    for rank in range(2):
        tensors = {}
        for name, tensor in state.items():
            if split_axis[name] is None:
                tensors[name] = tensor
            else:
                tensors[name] = paddle.to_tensor(np.array_split(tensor.numpy(), 2, axis=1)[rank])
        shard = {"tensors": tensors, "split_axis": split_axis, "tp_rank": rank, "tp_degree": 2, "slices": {}}
        paddle.save(shard, os.path.join(checkpoint, f"model_state.tp{rank:02d}_pp00.pdparams"))
    os.rename(os.path.join(checkpoint, "optimizer.tp00_pp00_sd00.pdopt"),
              os.path.join(checkpoint, "optimizer.tp01_pp00_sd00.pdopt"))
    shutil.copy(os.path.join(checkpoint, "optimizer.tp01_pp00_sd00.pdopt"),
                os.path.join(checkpoint, "optimizer.tp00_pp00_sd00.pdopt"))
    shutil.copy(os.path.join(checkpoint, "rng_state_rank0.pkl"), os.path.join(checkpoint, "rng_state_rank1.pkl"))
    state_path = os.path.join(checkpoint, "trainer_state.json")
    with open(state_path) as f:
        trainer_state = json.load(f)
    trainer_state["layout"].update(tp_degree=2, world_size=2)
    trainer_state["files"] = {name: os.path.getsize(os.path.join(checkpoint, name))
                              for name in sorted(os.listdir(checkpoint)) if name != "trainer_state.json"}
    with open(state_path, "w") as f:
        json.dump(trainer_state, f)


def test_tensor_parallel_export_without_optimizer(run_copy, reference, tmp_path, export_log):
    checkpoint = os.path.join(run_copy, "checkpoint-2")
    make_tensor_parallel_checkpoint(checkpoint)
    for name in ("optimizer.tp00_pp00_sd00.pdopt", "optimizer.tp01_pp00_sd00.pdopt", "rng_state_rank1.pkl"):
        os.remove(os.path.join(checkpoint, name))
    out_dir = str(tmp_path / "hf")

    assert export_main([checkpoint, out_dir]) == 0, messages(export_log, logging.ERROR)

    assert_tensors_equal(read_safetensors(os.path.join(out_dir, "model.safetensors")), reference[1])


def test_tensor_parallel_export_missing_model_file(run_copy, tmp_path, export_log):
    checkpoint = os.path.join(run_copy, "checkpoint-2")
    make_tensor_parallel_checkpoint(checkpoint)
    os.remove(os.path.join(checkpoint, "model_state.tp01_pp00.pdparams"))

    assert export_main([checkpoint, str(tmp_path / "hf")]) == 2

    assert "model_state.tp01_pp00.pdparams is damaged (FileNotFoundError" in messages(export_log, logging.ERROR)[0]


# ---- CHECKPOINT_DIR that is not a checkpoint ----


def test_checkpoint_dir_messages(trained_run, reference, tmp_path):
    newest = os.path.join(trained_run, "checkpoint-2")
    cases = [
        (str(tmp_path / "missing"), "does not exist"),
        (os.path.join(trained_run, "metrics.jsonl"), "is a file, not a directory"),
        (trained_run, f"is a run's output_dir, not a checkpoint; pass one of its checkpoint-STEP directories, "
                      f"e.g. the newest: {newest}"),
        (reference[0], "is already in Hugging Face layout"),
    ]
    for checkpoint_dir, expected in cases:
        with pytest.raises(ConfigError) as error:
            export_checkpoint(checkpoint_dir, str(tmp_path / "hf"))
        assert f"CHECKPOINT_DIR '{checkpoint_dir}' {expected}" in str(error.value)
    assert not os.path.exists(tmp_path / "hf")


def test_command_line_logs_one_line(trained_run, tmp_path):
    command = [sys.executable, "-m", "fleetlm.export"]
    ok = subprocess.run(command + [os.path.join(trained_run, "checkpoint-2"), str(tmp_path / "hf")],
                        cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert f"INFO fleetlm.export: exported 21 tensors of model_type llama (Hugging Face layout llama) to " \
           f"{tmp_path / 'hf'}" in ok.stderr

    failed = subprocess.run(command + [str(tmp_path / "missing"), str(tmp_path / "hf2")],
                            cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert failed.returncode == 2
    lines = [line for line in failed.stderr.splitlines() if "fleetlm" in line]
    assert len(lines) == 1
    assert f"ERROR fleetlm.export: CHECKPOINT_DIR '{tmp_path / 'missing'}' does not exist" in lines[0]
    assert "Traceback" not in failed.stderr
