"""data_tools/train_tokenizer.py: a trained SentencePiece model round-trips English and Chinese text."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import POETRY_DIR, REPO_ROOT, SHAKESPEARE_DIR
from fleetlm.data.indexed_dataset import open_token_documents
from fleetlm.data.preprocess import tokenize_corpus
from fleetlm.tokenizer import load_tokenizer


def test_trained_tokenizer_round_trip(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    shutil.copy(os.path.join(SHAKESPEARE_DIR, "macbeth_gut.txt"), corpus)
    shutil.copy(os.path.join(POETRY_DIR, "lunyu.json"), corpus)
    result = subprocess.run(
        [sys.executable, "data_tools/train_tokenizer.py", "--input_path", str(corpus), "--json_key", "paragraphs",
         "--vocab_size", "3000", "--output_prefix", str(tmp_path / "bpe"), "--workers", "2"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    tokenizer = load_tokenizer(str(tmp_path / "bpe.model"))
    assert tokenizer.vocab_size == 3000
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)

    prefix = str(tmp_path / "tokens")
    tokenize_corpus(str(corpus), str(tmp_path / "bpe.model"), prefix, json_keys=["paragraphs"], append_eos=True)
    documents = open_token_documents(prefix)
    with open(os.path.join(POETRY_DIR, "lunyu.json"), encoding="utf-8") as handle:
        chapters = ["\n".join(record["paragraphs"]) for record in json.load(handle)]
    with open(os.path.join(SHAKESPEARE_DIR, "macbeth_gut.txt"), encoding="utf-8") as handle:
        play = handle.read()

    # Sorted by file name: lunyu.json's 20 chapters, then the play.
    expected = chapters + [play]
    assert documents.num_documents == len(expected)
    assert documents.dtype == np.uint16
    for index, text in enumerate(expected):
        ids = documents.document(index).tolist()
        assert ids[-1] == 2
        assert tokenizer.decode(ids[:-1]) == text, f"document {index} differs"


def train(tmp_path, *extra, prefix="bpe"):
    return subprocess.run(
        [sys.executable, "data_tools/train_tokenizer.py", "--input_path", os.path.join(SHAKESPEARE_DIR, "macbeth_gut.txt"),
         "--output_prefix", str(tmp_path / prefix), *extra],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )


@pytest.mark.parametrize("options, message", [
    (["--vocab_size", "100"], "--vocab_size 100 is too small"),
    (["--character_coverage", "1.5"], "--character_coverage 1.5 is outside 0.98..1"),
    (["--character_coverage", "0.5"], "--character_coverage 0.5 is outside 0.98..1"),
    (["--max_sentence_length", "5"], "--max_sentence_length 5 is outside 10..1073741824 bytes"),
    (["--max_sentences", "-1"], "--max_sentences -1 is negative"),
    (["--workers", "0"], "--workers 0: give 1 to 1024 threads"),
    (["--workers", "100000"], "--workers 100000: give 1 to 1024 threads"),
    (["--seed", "-5"], "--seed -5 is outside 0..4294967295"),
    (["--json_key", "text", "--json_key", "text"], "--json_key names 'text' more than once"),
])
def test_bad_option_rejected_before_reading(tmp_path, options, message):
    result = train(tmp_path, *options)
    assert result.returncode == 2
    assert message in result.stderr
    assert os.listdir(tmp_path) == []


def test_prefix_with_suffix_rejected(tmp_path):
    result = train(tmp_path, prefix="bpe.model")
    assert result.returncode == 2
    assert "give a path without suffix" in result.stderr


def test_existing_model_kept_without_overwrite(tmp_path):
    (tmp_path / "bpe.model").write_bytes(b"older model")
    result = train(tmp_path, "--vocab_size", "1000")
    assert result.returncode == 2
    assert "bpe.model already exists; pass --overwrite" in result.stderr
    assert (tmp_path / "bpe.model").read_bytes() == b"older model"


def test_failed_training_keeps_older_model(tmp_path):
    (tmp_path / "bpe.model").write_bytes(b"older model")
    (tmp_path / "bpe.vocab").write_bytes(b"older vocab")
    # 300 pieces cannot hold the play's characters next to the 256 byte pieces: SentencePiece fails.
    result = train(tmp_path, "--vocab_size", "300", "--overwrite")
    assert result.returncode == 1
    assert "SentencePiece training failed" in result.stderr
    assert sorted(os.listdir(tmp_path)) == ["bpe.model", "bpe.vocab"]  # no temporary files left
    assert (tmp_path / "bpe.model").read_bytes() == b"older model"


def test_overwrite_replaces_model_and_removes_stale_temporary_files(tmp_path):
    (tmp_path / "bpe.model").write_bytes(b"older model")
    # Left by a run killed with SIGTERM (process 999999999 does not exist).
    stale = tmp_path / ".bpe.tokenizer.999999999.0123abcd.tmp.model"
    stale.write_bytes(b"partial")
    result = train(tmp_path, "--vocab_size", "1000", "--overwrite")
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(tmp_path)) == ["bpe.model", "bpe.vocab"]
    assert load_tokenizer(str(tmp_path / "bpe.model")).vocab_size == 1000


def test_directory_in_place_of_output_rejected(tmp_path):
    (tmp_path / "bpe.vocab").mkdir()
    result = train(tmp_path, "--vocab_size", "1000", "--overwrite")
    assert result.returncode == 2
    assert "bpe.vocab is a directory" in result.stderr
