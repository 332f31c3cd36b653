"""Command-line handling: unreadable argument files, duplicate flags, batch keys and the help text."""

import json
import os
import subprocess
import sys

import pytest

from fleetlm import arguments
from fleetlm.arguments import ConfigError, format_help, parse_arguments
from fleetlm.validate import plan_run

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_json(tmp_path, values, name="args.json"):
    path = tmp_path / name
    path.write_text(json.dumps(values))
    return str(path)


def test_directory_as_argument_file_names_json_files(tmp_path):
    (tmp_path / "pretrain_big-tp8.json").write_text("{}")
    (tmp_path / "pretrain_tiny-debug.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("")
    with pytest.raises(ConfigError) as info:
        parse_arguments([str(tmp_path), "--max_steps", "1"])
    message = str(info.value)
    assert f"Argument file {tmp_path} is a directory" in message
    # The debug file comes first, as the one to try first.
    assert f"such as {tmp_path / 'pretrain_tiny-debug.json'}, {tmp_path / 'pretrain_big-tp8.json'}." in message
    assert "notes.txt" not in message
    assert "\n" not in message


def test_empty_directory_as_argument_file(tmp_path):
    with pytest.raises(ConfigError, match="is a directory, not a JSON file; pass the path of a JSON argument file"):
        parse_arguments([str(tmp_path)])


def test_unreadable_argument_file_rejected(tmp_path, monkeypatch):
    path = write_json(tmp_path, {"max_steps": 1})

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", path)

    # Root reads files whatever their mode, so the denial is simulated.
    monkeypatch.setattr(arguments, "open", denied, raising=False)
    with pytest.raises(ConfigError, match=f"Argument file {path} cannot be read: permission denied"):
        parse_arguments([path])


def test_argument_file_with_bom_accepted(tmp_path):
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"max_steps": 7}).encode())
    assert parse_arguments([str(path)]).training.max_steps == 7


def test_argument_file_not_utf8_rejected(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes(b'{"output_dir": "caf\xe9"}')
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        parse_arguments([str(path)])


@pytest.mark.parametrize("argv, key, value, note", [
    (["--learning_rate", "0.1", "--learning_rate", "0.2"], "learning_rate", 0.2,
     "--learning_rate is given more than once on the command line ('0.1', then '0.2'); the last one is used"),
    (["--max_steps=3", "--max-steps", "4"], "max_steps", 4,
     "--max_steps is given more than once on the command line ('3', then '4')"),
    (["--do_eval", "--do_eval", "false"], "do_eval", False,
     "--do_eval is given more than once on the command line (no value, then 'false')"),
])
def test_repeated_cli_flag_last_wins(argv, key, value, note):
    # A wrapper script appends its override to a fixed command line: the last value wins, as with argparse.
    args = parse_arguments(argv)
    assert getattr(args.training, key) == value
    assert note in args.overridden[f"--{key}"]


def test_cli_global_batch_overrides_file(tmp_path):
    path = write_json(tmp_path, {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2})
    args = parse_arguments([path, "--global_batch_size", "8"])
    assert args.training.gradient_accumulation_steps == 1
    assert args.overridden == {
        "gradient_accumulation_steps": (
            f"dropping gradient_accumulation_steps=2 from {path}: --global_batch_size 8 on the command line sets the "
            "batch instead (gradient_accumulation_steps is derived from it)"
        )
    }
    assert plan_run(args, 1).batch.accumulation_steps == 4


def test_cli_accumulation_overrides_file(tmp_path):
    path = write_json(tmp_path, {"per_device_train_batch_size": 2, "global_batch_size": 64,
                                 "gradient_accumulation_steps": 32})
    args = parse_arguments([path, "--gradient_accumulation_steps", "2"])
    assert args.training.global_batch_size == 0
    assert set(args.overridden) == {"global_batch_size"}
    assert "dropping global_batch_size=64" in args.overridden["global_batch_size"]
    assert plan_run(args, 1).batch.accumulation_steps == 2


def test_batch_keys_kept_without_cli_conflict(tmp_path):
    path = write_json(tmp_path, {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2})
    # --global_batch_size 0 derives nothing, so the file's accumulation stays.
    args = parse_arguments([path, "--global_batch_size", "0"])
    assert args.training.gradient_accumulation_steps == 2
    assert args.overridden == {}
    args = parse_arguments([path, "--max_steps", "3"])
    assert args.training.gradient_accumulation_steps == 2
    assert args.overridden == {}


def test_file_default_batch_key_dropped_quietly(tmp_path):
    path = write_json(tmp_path, {"gradient_accumulation_steps": 1})
    args = parse_arguments([path, "--global_batch_size", "4"])
    assert args.overridden == {}
    assert args.training.global_batch_size == 4


def test_same_source_batch_contradiction_rejected(tmp_path):
    path = write_json(tmp_path, {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2,
                                 "global_batch_size": 8})
    with pytest.raises(ConfigError, match="gradient_accumulation_steps=2 contradicts global_batch_size=8"):
        plan_run(parse_arguments([path]), 1)
    with pytest.raises(ConfigError, match="gradient_accumulation_steps=3 contradicts global_batch_size=8"):
        plan_run(parse_arguments(["--global_batch_size", "8", "--per_device_train_batch_size", "2",
                                  "--gradient_accumulation_steps", "3"]), 1)


def test_help_lists_dry_run():
    text = format_help()
    assert "[--dry_run]" in text.splitlines()[0]
    assert "  --dry_run (switch; also --dry_run true or false)" in text
    assert "An option given twice on the command" in text


def test_dry_run_in_argument_file_rejected(tmp_path):
    with pytest.raises(ConfigError, match="dry_run is a command-line switch only: write --dry_run after"):
        parse_arguments([write_json(tmp_path, {"dry_run": True})])


@pytest.mark.parametrize("extra", [[], ["--dry_run"]])
def test_run_pretrain_directory_exits_2(extra):
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    result = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "run_pretrain.py"), "llama", *extra],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "Argument file llama is a directory, not a JSON file; pass one of the JSON files in it, such as " \
           "llama/pretrain_llama-debug.json" in result.stderr
