"""PREFIX.meta.json: written by create_pretraining_data.py, checked and carried on by merge_data.py, shown by inspect_data.py."""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT, SHAKESPEARE_DIR, TOKENIZERS
from fleetlm.data.indexed_dataset import IndexedDatasetWriter, open_token_documents

PLAYS = {name: os.path.join(SHAKESPEARE_DIR, f"{name}_gut.txt") for name in ("hamlet", "tempest")}


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join("data_tools", script), *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)


def tokenize(input_path: str, prefix: str, tokenizer: str = "gpt2", *extra: str) -> None:
    result = run("create_pretraining_data.py", "--tokenizer_name_or_path", TOKENIZERS[tokenizer],
                 "--input_path", input_path, "--output_prefix", prefix, *extra)
    assert result.returncode == 0, result.stderr


def read_json(path) -> dict:
    with open(path) as handle:
        return json.load(handle)


def test_create_writes_metadata(tmp_path):
    prefix = str(tmp_path / "hamlet")
    tokenize(PLAYS["hamlet"], prefix, "gpt2", "--append_eos")
    metadata = read_json(prefix + ".meta.json")
    documents = open_token_documents(prefix)
    with open(TOKENIZERS["gpt2"], "rb") as handle:
        sha256 = hashlib.sha256(handle.read()).hexdigest()

    assert metadata["tool"] == "data_tools/create_pretraining_data.py"
    assert metadata["tokenizer"]["name"] == "gpt2"
    assert metadata["tokenizer"]["kind"] == "tiktoken"
    assert metadata["tokenizer"]["vocab_size"] == 50257
    assert metadata["tokenizer"]["eos_token_id"] == 50256
    assert metadata["tokenizer"]["sha256"] == sha256
    assert metadata["append_eos"] is True
    assert metadata["json_keys"] == ["text"]
    assert metadata["token_dtype"] == "uint16"
    assert metadata["documents"] == documents.num_documents == 1
    assert metadata["tokens"] == documents.num_tokens
    assert sorted(os.listdir(tmp_path)) == ["hamlet.bin", "hamlet.idx", "hamlet.meta.json"]


def test_overwrite_replaces_metadata(tmp_path):
    prefix = str(tmp_path / "out")
    tokenize(PLAYS["hamlet"], prefix, "gpt2")
    tokenize(PLAYS["tempest"], prefix, "mistral-spm", "--overwrite")
    metadata = read_json(prefix + ".meta.json")

    assert metadata["tokenizer"]["name"] == "mistral-spm"
    assert metadata["tokens"] == open_token_documents(prefix).num_tokens


def test_existing_metadata_alone_needs_overwrite(tmp_path):
    prefix = str(tmp_path / "out")
    (tmp_path / "out.meta.json").write_text("{}")
    result = run("create_pretraining_data.py", "--tokenizer_name_or_path", TOKENIZERS["gpt2"],
                 "--input_path", PLAYS["hamlet"], "--output_prefix", prefix)
    assert result.returncode == 2
    assert "out.meta.json already exists; pass --overwrite" in result.stderr


def test_writer_without_metadata_removes_old_file(tmp_path):
    prefix = str(tmp_path / "d")
    (tmp_path / "d.meta.json").write_text('{"tokens": 1}')
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        writer.add_document(np.array([1, 2, 3]))
        writer.finalize()
    assert sorted(os.listdir(tmp_path)) == ["d.bin", "d.idx"]


def test_merge_rejects_different_tokenizers(tmp_path):
    # GPT-2 and Mistral ids are both uint16, so the dtype check alone lets them through.
    tokenize(PLAYS["hamlet"], str(tmp_path / "gpt2_part"), "gpt2")
    tokenize(PLAYS["tempest"], str(tmp_path / "mistral_part"), "mistral-spm")
    result = run("merge_data.py", "--input", str(tmp_path / "gpt2_part"), str(tmp_path / "mistral_part"),
                 "--output_prefix", str(tmp_path / "merged"))

    assert result.returncode == 1
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: cannot merge token files made by different tokenizers")
    assert f"{tmp_path / 'gpt2_part'} used 'gpt2' (tiktoken, vocab_size 50257" in error
    assert f"{tmp_path / 'mistral_part'} used 'mistral-spm' (sentencepiece, vocab_size 32000" in error
    assert not any(name.startswith("merged") or name.endswith(".tmp") for name in os.listdir(tmp_path))


def test_merge_same_tokenizer_writes_metadata(tmp_path):
    tokenize(PLAYS["hamlet"], str(tmp_path / "a"), "gpt2", "--append_eos")
    tokenize(PLAYS["tempest"], str(tmp_path / "b"), "gpt2")
    result = run("merge_data.py", "--input", str(tmp_path / "a"), str(tmp_path / "b"),
                 "--output_prefix", str(tmp_path / "merged"))
    assert result.returncode == 0, result.stderr
    metadata = read_json(tmp_path / "merged.meta.json")
    inputs = read_json(tmp_path / "a.meta.json")

    assert "WARNING" not in result.stderr
    assert metadata["tool"] == "data_tools/merge_data.py"
    assert metadata["tokenizer"] == inputs["tokenizer"]
    assert metadata["documents"] == 2
    assert metadata["tokens"] == open_token_documents(str(tmp_path / "merged")).num_tokens
    assert metadata["append_eos"] is None  # the inputs differ
    assert metadata["json_keys"] == ["text"]
    assert metadata["inputs"] == [str(tmp_path / "a"), str(tmp_path / "b")]


def test_merge_without_metadata_warns(tmp_path):
    tokenize(PLAYS["hamlet"], str(tmp_path / "a"), "gpt2")
    tokenize(PLAYS["tempest"], str(tmp_path / "b"), "gpt2")
    os.remove(tmp_path / "b.meta.json")  # as in a file that PaddleNLP wrote
    (tmp_path / "merged.meta.json").write_text("{}")  # left by an earlier merge
    result = run("merge_data.py", "--input", str(tmp_path / "a"), str(tmp_path / "b"),
                 "--output_prefix", str(tmp_path / "merged"), "--overwrite")

    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "WARNING" in line]
    assert len(warnings) == 1
    assert "cannot check that the inputs were made by one tokenizer" in warnings[0]
    assert str(tmp_path / "b") in warnings[0]
    assert str(tmp_path / "a") + "," not in warnings[0]
    assert not os.path.exists(tmp_path / "merged.meta.json")
    assert open_token_documents(str(tmp_path / "merged")).num_documents == 2


def test_merge_ignores_metadata_of_other_pair(tmp_path):
    tokenize(PLAYS["hamlet"], str(tmp_path / "a"), "gpt2")
    tokenize(PLAYS["tempest"], str(tmp_path / "b"), "mistral-spm")
    # b's token files replaced by a tool that writes no metadata: the old file no longer describes them.
    for suffix in (".bin", ".idx"):
        os.replace(tmp_path / f"a{suffix}", tmp_path / f"b{suffix}")
    tokenize(PLAYS["hamlet"], str(tmp_path / "a"), "gpt2", "--overwrite")
    result = run("merge_data.py", "--input", str(tmp_path / "a"), str(tmp_path / "b"),
                 "--output_prefix", str(tmp_path / "merged"))

    assert result.returncode == 0, result.stderr
    assert f"ignoring {tmp_path / 'b.meta.json'}" in result.stderr
    assert "cannot check that the inputs were made by one tokenizer" in result.stderr


@pytest.mark.parametrize("second", ["{dir}/a", "{dir}/./a", "{dir}/link"])
def test_merge_rejects_same_input_twice(tmp_path, second):
    first = str(tmp_path / "a")
    tokenize(PLAYS["tempest"], first, "gpt2")
    for suffix in (".bin", ".idx"):
        os.symlink(tmp_path / f"a{suffix}", tmp_path / f"link{suffix}")
    duplicate = second.format(dir=tmp_path)
    result = run("merge_data.py", "--input", first, duplicate, "--output_prefix", str(tmp_path / "merged"))

    assert result.returncode == 1
    assert f"error: input {duplicate!r} is given twice" in result.stderr
    assert str(tmp_path / "a.idx") in result.stderr
    assert not os.path.exists(tmp_path / "merged.bin")


def test_merge_rejects_older_pair_twice(tmp_path):
    prefix = str(tmp_path / "old")
    np.save(prefix + "_ids.npy", np.arange(5, dtype=np.uint16))
    np.savez(prefix + "_idx.npz", lens=np.array([2, 3], dtype=np.int32), docs=np.array([0, 1, 2], dtype=np.int64))
    result = run("merge_data.py", "--input", prefix, str(tmp_path / "." / "old"), "--output_prefix",
                 str(tmp_path / "merged"))

    assert result.returncode == 1
    assert "is given twice" in result.stderr
    assert "old_idx.npz" in result.stderr


def test_inspect_shows_metadata(tmp_path):
    prefix = str(tmp_path / "hamlet")
    tokenize(PLAYS["hamlet"], prefix, "gpt2")
    shown = run("inspect_data.py", "--input_prefix", prefix)
    os.remove(prefix + ".meta.json")
    absent = run("inspect_data.py", "--input_prefix", prefix)

    assert shown.returncode == 0, shown.stderr
    assert f"metadata:   {prefix}.meta.json" in shown.stdout
    assert '"name": "gpt2"' in shown.stdout
    assert '"sha256": ' in shown.stdout
    assert absent.returncode == 0, absent.stderr
    assert "metadata:   none" in absent.stdout


def test_merge_keeps_existing_output(tmp_path):
    tokenize(PLAYS["hamlet"], str(tmp_path / "a"), "gpt2")
    tokenize(PLAYS["tempest"], str(tmp_path / "b"), "gpt2")
    before = (tmp_path / "b.bin").read_bytes()
    result = run("merge_data.py", "--input", str(tmp_path / "a"), "--output_prefix", str(tmp_path / "b"))

    assert result.returncode == 2
    assert f"{tmp_path / 'b'}.bin already exists; pass --overwrite" in result.stderr
    assert (tmp_path / "b.bin").read_bytes() == before


def test_merge_directory_skips_its_own_output(tmp_path):
    tokenize(PLAYS["hamlet"], str(tmp_path / "a"), "gpt2")
    tokenize(PLAYS["tempest"], str(tmp_path / "b"), "gpt2")
    for _ in range(2):
        result = run("merge_data.py", "--input", str(tmp_path), "--output_prefix", str(tmp_path / "all"), "--overwrite")
        assert result.returncode == 0, result.stderr
        assert "inputs 2," in result.stdout


def test_merge_rejects_metadata_with_malformed_tokenizer(tmp_path):
    for name in ("a", "b"):
        tokenize(PLAYS["hamlet"], str(tmp_path / name), "gpt2")
    metadata_file = tmp_path / "b.meta.json"
    record = read_json(metadata_file)
    record["tokenizer"] = "gpt2"
    metadata_file.write_text(json.dumps(record))
    result = run("merge_data.py", "--input", str(tmp_path / "a"), str(tmp_path / "b"),
                 "--output_prefix", str(tmp_path / "merged"))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: metadata file '{metadata_file}': \"tokenizer\" is 'gpt2', not an object with the tokenizer's name, "
        "sha256 and vocab_size; delete the file (the token files do not need it) or regenerate the token files")
    assert not any(name.startswith("merged") for name in os.listdir(tmp_path))
