"""Argument checks of create_pretraining_data.py that run before any file is read or written."""

import os
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(REPO_ROOT, "data_tools", "create_pretraining_data.py")
GPT2 = os.path.join(REPO_ROOT, "tests", "assets", "tokenizers", "gpt2")
PLAY = os.path.join(REPO_ROOT, "examples", "data", "shakespeare", "tempest_gut.txt")


def run_tool(*args):
    return subprocess.run([sys.executable, TOOL, "--input_path", PLAY, "--tokenizer_name_or_path", GPT2, *args],
                          capture_output=True, text=True)


@pytest.mark.parametrize("args, expected", [
    (["--workers", "0"], "--workers 0: must be at least 1"),
    (["--workers", "100000"], "is more than 4 per CPU core"),
    (["--json_key", "text", "title", "text"], "--json_key names 'text' more than once; give each key once"),
    (["--json_key", "text", "--json_key", "text"], "--json_key names 'text' more than once; give each key once"),
    (["--log_interval", "0"], "--log_interval 0: must be at least 1"),
])
def test_bad_numbers_exit_2(tmp_path, args, expected):
    result = run_tool("--output_prefix", str(tmp_path / "out"), *args)
    assert result.returncode == 2
    assert expected in result.stderr
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("suffix", ["out.bin", "out.idx", "sub/"])
def test_prefix_with_suffix_rejected(tmp_path, suffix):
    (tmp_path / "sub").mkdir()
    result = run_tool("--output_prefix", f"{tmp_path}/{suffix}")
    assert result.returncode == 2
    assert "give a path without suffix" in result.stderr


def test_existing_output_kept_unless_overwrite(tmp_path):
    prefix = str(tmp_path / "out")
    assert run_tool("--output_prefix", prefix).returncode == 0
    before = open(prefix + ".bin", "rb").read()
    again = run_tool("--output_prefix", prefix)
    assert again.returncode == 2
    assert "out.bin already exists; pass --overwrite" in again.stderr
    assert open(prefix + ".bin", "rb").read() == before
    assert run_tool("--output_prefix", prefix, "--overwrite").returncode == 0


def test_registered_name_without_tokenizer_explained(tmp_path):
    result = subprocess.run([sys.executable, TOOL, "--input_path", PLAY, "--tokenizer_name_or_path", "THUDM/glm-130b",
                             "--output_prefix", str(tmp_path / "out2")], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "error: tokenizer not found: 'THUDM/glm-130b' is a registered model name, but fleetlm bundles no tokenizer "
        "for it; pass the path of that checkpoint's tokenizer file (tokenizer.model, tokenizer.json or *.tiktoken)")
    assert not os.path.exists(tmp_path / "out2.bin")


@pytest.mark.parametrize("name", ["out.meta.json", "out.idx"])
def test_directory_in_place_of_output_rejected_before_writing(tmp_path, name):
    prefix = str(tmp_path / "out")
    assert run_tool("--output_prefix", prefix).returncode == 0
    os.remove(os.path.join(tmp_path, name))
    os.mkdir(os.path.join(tmp_path, name))
    before = open(prefix + ".bin", "rb").read()
    result = run_tool("--output_prefix", prefix, "--overwrite", "--append_eos")
    assert result.returncode == 2
    assert f"{name} is a directory; remove it or choose another --output_prefix" in result.stderr
    assert open(prefix + ".bin", "rb").read() == before


def test_repeated_json_key_flags_add_up(tmp_path):
    corpus = tmp_path / "in.jsonl"
    corpus.write_text('{"title": "Macbeth", "text": "When shall we three meet again"}\n')
    one_flag = run_tool("--input_path", str(corpus), "--json_key", "title", "text", "--output_prefix", str(tmp_path / "a"))
    two_flags = run_tool("--input_path", str(corpus), "--json_key", "title", "--json_key", "text",
                         "--output_prefix", str(tmp_path / "b"))
    last_only = run_tool("--input_path", str(corpus), "--json_key", "text", "--output_prefix", str(tmp_path / "c"))
    assert one_flag.returncode == 0, one_flag.stderr
    assert two_flags.returncode == 0, two_flags.stderr
    assert last_only.returncode == 0, last_only.stderr
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()
    # Both keys were tokenized, not the last one alone.
    assert (tmp_path / "b.bin").read_bytes() != (tmp_path / "c.bin").read_bytes()
