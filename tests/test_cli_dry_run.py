"""``python -m fleetlm.dry_run`` and the dry-run report: help, --world_size, split, layout wording."""

import os

import pytest

from fleetlm.arguments import ConfigError, parse_arguments
from fleetlm.dry_run import describe_run, main
from fleetlm.models.registry import MODEL_REGISTRY, closest_names, unknown_name_hint

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEBUG_FILE = os.path.join(REPO_ROOT, "llama", "pretrain_llama-debug.json")


@pytest.mark.parametrize("argv", [[DEBUG_FILE, "--help"], [DEBUG_FILE, "--max_steps", "3", "-h"], ["--help"]])
def test_help_anywhere_prints_usage(argv, capsys):
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "Usage: ``python -m fleetlm.dry_run CONFIG.json [--world_size N] [--key value ...]``" in out
    assert "python run_pretrain.py --help" in out


def test_directory_in_place_of_file_exits_2(capsys):
    assert main([os.path.join(REPO_ROOT, "llama")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "is a directory, not a JSON file; pass one of the JSON files in it" in err


@pytest.mark.parametrize("argv, expected", [
    (["--world_size", "x"], "--world_size 'x': expected a positive number of cards"),
    (["--world_size", "0"], "--world_size '0': expected a positive number of cards"),
    (["--world_size"], "--world_size needs a value"),
    (["--world_size", "--max_steps", "3"], "--world_size needs a value"),
    (["--world_size", "2", "--world_size", "4"], "--world_size is given twice"),
])
def test_bad_world_size_exits_2(argv, expected, capsys):
    assert main([DEBUG_FILE, *argv]) == 2
    assert expected in capsys.readouterr().err


@pytest.mark.parametrize("split, expected", [
    ("9:1", "split '9:1' has the non-numeric field '9:1'"),
    ("1,1,1,1", "split '1,1,1,1' has 4 fields"),
    ("0,0,0", "split '0,0,0'"),
])
def test_dry_run_checks_split(split, expected):
    with pytest.raises(ConfigError) as info:
        describe_run(parse_arguments([DEBUG_FILE, "--split", split]))
    assert expected in str(info.value)


def test_dry_run_split_error_exits_2(capsys):
    assert main([DEBUG_FILE, "--split", "9:1"]) == 2
    assert "error: split '9:1'" in capsys.readouterr().err


def test_layout_line_singular_and_plural():
    single_card = describe_run(parse_arguments([DEBUG_FILE]))
    assert "layout: 1 card = tp 1 x pp 1 x dp 1; sharding off; fp32" in single_card
    four_cards = describe_run(parse_arguments([DEBUG_FILE, "--sharding", "stage1"]), world_size=4)
    assert "layout: 4 cards = tp 1 x pp 1 x dp 4; sharding stage1 over 4 ranks; fp32" in four_cards


def test_sharding_over_one_rank_noted():
    report = describe_run(parse_arguments([DEBUG_FILE, "--sharding", "stage2", "--sharding_parallel_degree", "1"]),
                          world_size=2)
    assert "sharding stage2 over 1 rank, which divides nothing (raise sharding_parallel_degree" in report


@pytest.mark.parametrize("name, intended", [
    ("meta-llama/Llama-2-7B", "meta-llama/Llama-2-7b"),
    ("Qwen/Qwen-7B", "qwen/qwen-7b"),
    ("meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-7b"),
    ("GPT3-125M", "gpt3-125m"),
])
def test_model_name_hint_for_case_and_hub_spelling(name, intended):
    hint = unknown_name_hint(name)
    assert hint.startswith(f"Did you mean '{intended}'? Closest registered names: {intended}, ")
    assert len(hint) < 300


def test_model_name_hint_lists_five_closest_only():
    assert closest_names("qwen/qwen-72b")[:2] == ["qwen/qwen-7b", "qwen/qwen-14b"]
    hint = unknown_name_hint("qwen/qwen-72b")
    # A different size is a different model, so no single name is proposed.
    assert "Did you mean" not in hint
    listed = hint.split("Closest registered names: ")[1].split(" (")[0].split(", ")
    assert len(listed) == 5
    assert f"({len(MODEL_REGISTRY)} in all; fleetlm.models.registry.registered_names() lists them)" in hint


@pytest.mark.parametrize("argv, on, rest", [
    (["a.json", "--dry_run"], True, ["a.json"]),
    (["a.json", "--dry_run", "true", "--max_steps", "3"], True, ["a.json", "--max_steps", "3"]),
    (["a.json", "--dry_run", "false"], False, ["a.json"]),
    (["a.json", "--dry_run", "--max_steps", "3"], True, ["a.json", "--max_steps", "3"]),
    (["a.json"], False, ["a.json"]),
])
def test_dry_run_switch_with_or_without_value(argv, on, rest):
    from fleetlm.pretrain import _take_dry_run

    assert _take_dry_run(argv) == (on, rest)
