"""Shared paths and token files for the data pipeline tests."""

import os
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

TOKENIZER_DIR = os.path.join(REPO_ROOT, "tests", "assets", "tokenizers")
TOKENIZERS = {
    "gpt2": os.path.join(TOKENIZER_DIR, "gpt2", "gpt2.tiktoken"),
    "qwen": os.path.join(TOKENIZER_DIR, "qwen", "qwen.tiktoken"),
    "mistral-spm": os.path.join(TOKENIZER_DIR, "mistral-spm", "tokenizer.model"),
    "chatglm3": os.path.join(TOKENIZER_DIR, "chatglm3", "tokenizer.json"),
}
SHAKESPEARE_DIR = os.path.join(REPO_ROOT, "examples", "data", "shakespeare")
POETRY_DIR = os.path.join(REPO_ROOT, "examples", "data", "chinese-poetry")


@pytest.fixture(scope="session")
def shakespeare_gpt2(tmp_path_factory) -> str:
    """Prefix of the Shakespeare demo corpus tokenized with GPT-2, EOS appended."""
    from fleetlm.data.preprocess import tokenize_corpus

    prefix = str(tmp_path_factory.mktemp("shakespeare") / "shakespeare_gpt2")
    tokenize_corpus(SHAKESPEARE_DIR, TOKENIZERS["gpt2"], prefix, append_eos=True)
    return prefix
