"""Checks of trainer_state.json and config.json that decide whether a checkpoint can be resumed."""

import json
import os

import pytest

from fleetlm.arguments import ConfigError, parse_arguments
from fleetlm.pretrain import _check_resume, _layout_record
from fleetlm.trainer import checkpoint as ckpt
from fleetlm.validate import plan_run

SINGLE_PROCESS_LAYOUT = {"dp_degree": 1, "tp_degree": 1, "pp_degree": 1, "sharding_degree": 1, "world_size": 1,
                         "sharding": "", "sequence_parallel": False, "virtual_pp_degree": 1}


def write_checkpoint(directory, step=6, files=None, version=ckpt.FORMAT_VERSION, model=None, **state_changes):
    """Write a checkpoint directory with small stand-in files and a trainer_state.json that lists them."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model_state.pdparams").write_bytes(b"model")
    (directory / "optimizer.tp00_pp00_sd00.pdopt").write_bytes(b"optimizer")
    (directory / "config.json").write_text(json.dumps({"model": model or {}}))
    if files is None:
        files = {name: os.path.getsize(directory / name) for name in sorted(os.listdir(directory))}
    state = {"format_version": version, "step": step, "consumed_samples": step * 4, "layout": SINGLE_PROCESS_LAYOUT,
             "files": files, **state_changes}
    state = {key: value for key, value in state.items() if value is not ...}
    (directory / ckpt.TRAINER_STATE).write_text(json.dumps(state))
    return str(directory)


def test_saved_format_is_version_two():
    assert ckpt.FORMAT_VERSION == 2


def test_version_one_without_sizes_still_resumes(tmp_path):
    path = write_checkpoint(tmp_path / "checkpoint-6", version=1, files=...)
    assert ckpt.read_trainer_state(path).files is None
    ckpt.verify_file_sizes(path)
    os.remove(os.path.join(path, "optimizer.tp00_pp00_sd00.pdopt"))
    with pytest.raises(ckpt.DamagedCheckpointError, match="no optimizer file"):
        ckpt.verify_file_sizes(path)


def test_version_one_with_sizes_is_checked(tmp_path):
    path = write_checkpoint(tmp_path / "checkpoint-6", version=1)
    ckpt.verify_file_sizes(path)
    with open(os.path.join(path, "model_state.pdparams"), "ab") as f:
        f.write(b"x")
    with pytest.raises(ckpt.DamagedCheckpointError, match="model_state.pdparams is damaged .6 bytes, but 5 were saved"):
        ckpt.verify_file_sizes(path)


def test_version_two_without_sizes_is_damaged(tmp_path):
    path = write_checkpoint(tmp_path / "checkpoint-6", files=...)
    with pytest.raises(ckpt.DamagedCheckpointError) as info:
        ckpt.verify_file_sizes(path)
    assert info.value.file_name == ckpt.TRAINER_STATE
    assert "it has no files entry, but format version 2 needs an object of file names and sizes" in str(info.value)


def test_unknown_format_version_rejected(tmp_path):
    path = write_checkpoint(tmp_path / "checkpoint-6", version=3)
    with pytest.raises(ckpt.CheckpointError, match="has format_version 3; this fleetlm reads versions 1 and 2"):
        ckpt.read_trainer_state(path)


@pytest.mark.parametrize(
    "files, reason",
    [
        ([], "it has files=[], but format version 2 needs an object of file names and sizes"),
        ({"model_state.pdparams": "5"}, "its files list gives model_state.pdparams the size '5', not a non-negative"),
        ({"model_state.pdparams": True}, "the size True, not a non-negative integer"),
        ({"model_state.pdparams": 5.0}, "the size 5.0, not a non-negative integer"),
        ({"model_state.pdparams": -1}, "the size -1, not a non-negative integer"),
        ({"../outside.bin": 7},
         "its files list names '../outside.bin', which is not a file name inside the checkpoint"),
        ({"sub/model_state.pdparams": 5}, "names 'sub/model_state.pdparams', which is not a file name"),
        ({"..": 4096}, "names '..', which is not a file name"),
        ({"": 0}, "names '', which is not a file name"),
    ],
)
def test_invalid_file_sizes_are_damage(tmp_path, files, reason):
    path = write_checkpoint(tmp_path / "checkpoint-6", files=files)
    with pytest.raises(ckpt.DamagedCheckpointError) as info:
        ckpt.verify_file_sizes(path)
    assert info.value.file_name == ckpt.TRAINER_STATE
    assert reason in str(info.value)


def test_absolute_path_in_sizes_not_followed(tmp_path):
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"1234567")
    path = write_checkpoint(tmp_path / "checkpoint-6", files={str(outside): 7})
    with pytest.raises(ckpt.DamagedCheckpointError, match="which is not a file name inside the checkpoint"):
        ckpt.verify_file_sizes(path)


def test_step_differing_from_directory_name_is_damage(tmp_path):
    path = write_checkpoint(tmp_path / "checkpoint-6", step=4)
    with pytest.raises(ckpt.DamagedCheckpointError) as info:
        ckpt.verify_file_sizes(path)
    assert info.value.file_name == ckpt.TRAINER_STATE
    assert "it has step=4, but the directory name says step 6" in str(info.value)
    # A directory with another name (a copy made by hand) has no step to compare with.
    assert ckpt.read_trainer_state(write_checkpoint(tmp_path / "best", step=4)).step == 4


def resume_plan(*argv, world_size=1):
    args = parse_arguments(["--output_dir", "unused", "--max_steps", "10", *argv])
    return args, plan_run(args, world_size)


@pytest.mark.parametrize("content", ["", '{"model": {"hidden_size"', "[1, 2]", '{"model": 3}', b"\xff\xfe"])
def test_unreadable_config_is_damage(tmp_path, content):
    args, plan = resume_plan()
    path = write_checkpoint(tmp_path / "checkpoint-6", version=1, files=...)
    config = tmp_path / "checkpoint-6" / "config.json"
    if isinstance(content, bytes):
        config.write_bytes(content)
    else:
        config.write_text(content)
    with pytest.raises(ckpt.DamagedCheckpointError) as info:
        _check_resume(path, args, plan)
    assert info.value.file_name == "config.json"


def test_missing_config_is_damage(tmp_path):
    args, plan = resume_plan()
    path = write_checkpoint(tmp_path / "checkpoint-6", version=1, files=...)
    os.remove(os.path.join(path, "config.json"))
    with pytest.raises(ckpt.DamagedCheckpointError, match="config.json is damaged .FileNotFoundError"):
        _check_resume(path, args, plan)


def test_architecture_message_omits_same_layout(tmp_path):
    args, plan = resume_plan("--hidden_size", "128")
    saved_model = dict(plan.model_config.architecture_dict(), hidden_size=64)
    path = write_checkpoint(tmp_path / "checkpoint-6", model=saved_model, layout=_layout_record(args, plan))
    with pytest.raises(ConfigError) as info:
        _check_resume(path, args, plan)
    message = str(info.value)
    assert "cannot be resumed because the model architecture differs from the checkpoint's " \
           "(hidden_size: saved 64, requested 128)" in message
    assert "layout" not in message

    args, plan = resume_plan("--hidden_size", "128", world_size=2)
    with pytest.raises(ConfigError) as info:
        _check_resume(path, args, plan)
    assert "(hidden_size: saved 64, requested 128). The layout differs too (saved layout {" in str(info.value)
    assert "requested layout dp=2 tp=1 pp=1 sharding=1 (2 processes))" in str(info.value)
