"""data_tools/train_tokenizer.py: a trained SentencePiece model round-trips English and Chinese text."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np

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


def test_vocab_too_small_rejected(tmp_path):
    result = subprocess.run(
        [sys.executable, "data_tools/train_tokenizer.py", "--input_path", SHAKESPEARE_DIR, "--vocab_size", "100",
         "--output_prefix", str(tmp_path / "bpe")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1
    assert "--vocab_size 100 is too small" in result.stderr
    assert not os.path.exists(tmp_path / "bpe.model")
