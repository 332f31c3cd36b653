"""fleetlm.tokenizer on the real tokenizer files under tests/assets/tokenizers."""

import os
import shutil

import numpy as np
import pytest

from conftest import TOKENIZER_DIR, TOKENIZERS
from fleetlm.tokenizer import TokenizerError, load_tokenizer


@pytest.mark.parametrize(
    "name, kind, vocab_size, eos, bos",
    [
        ("gpt2", "tiktoken", 50257, 50256, 50256),
        ("qwen", "tiktoken", 151851, 151643, None),
        ("mistral-spm", "sentencepiece", 32000, 2, 1),
        # 64,789 BPE pieces, then the special tokens of tokenizer_config.json up to <|assistant|> = 64796.
        ("chatglm3", "huggingface", 64797, 2, None),
    ],
)
def test_tokenizer_properties(name, kind, vocab_size, eos, bos):
    tokenizer = load_tokenizer(TOKENIZERS[name])
    assert tokenizer.kind == kind
    assert tokenizer.vocab_size == vocab_size
    assert tokenizer.eos_token_id == eos
    assert tokenizer.bos_token_id == bos
    assert tokenizer.name == name


def test_gpt2_known_ids():
    tokenizer = load_tokenizer(TOKENIZERS["gpt2"])
    text = "Hello world's  end\n\n  123 ünïcödé 春眠不觉晓 <|endoftext|>"
    ids = tokenizer.encode(text)
    # "Hello", " world", "'s" in GPT-2's published vocabulary.
    assert ids[:3] == [15496, 995, 338]
    assert tokenizer.decode(ids) == text
    # Special-token text in the input is ordinary text, so no id 50256 appears.
    assert 50256 not in ids


def test_qwen_special_tokens_decode():
    tokenizer = load_tokenizer(TOKENIZERS["qwen"])
    assert tokenizer.decode([151644, 151645, 151646, 151850]) == "<|im_start|><|im_end|><|extra_0|><|extra_204|>"


def test_directory_resolves_file():
    assert load_tokenizer(os.path.join(TOKENIZER_DIR, "mistral-spm")).kind == "sentencepiece"
    assert load_tokenizer(os.path.join(TOKENIZER_DIR, "chatglm3")).kind == "huggingface"
    assert load_tokenizer(os.path.join(TOKENIZER_DIR, "qwen")).name == "qwen"


def test_missing_path_named():
    with pytest.raises(TokenizerError, match="tokenizer not found: 'no/such/path'"):
        load_tokenizer("no/such/path")


def test_unknown_tiktoken_file_rejected(tmp_path):
    shutil.copy(TOKENIZERS["gpt2"], tmp_path / "mine.tiktoken")
    with pytest.raises(TokenizerError) as error:
        load_tokenizer(str(tmp_path / "mine.tiktoken"))
    assert "unknown tiktoken file" in str(error.value)
    assert "gpt2.tiktoken" in str(error.value)


def test_truncated_tiktoken_file_rejected(tmp_path):
    with open(TOKENIZERS["gpt2"], "rb") as handle:
        lines = handle.readlines()
    (tmp_path / "gpt2.tiktoken").write_bytes(b"".join(lines[:1000]))
    with pytest.raises(TokenizerError, match="has 1000 ranks, expected 50256"):
        load_tokenizer(str(tmp_path / "gpt2.tiktoken"))


def test_empty_directory_rejected(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer file in directory"):
        load_tokenizer(str(tmp_path))


def test_unsupported_file_rejected(tmp_path):
    (tmp_path / "vocab.txt").write_text("a\n")
    with pytest.raises(TokenizerError, match="unsupported tokenizer file"):
        load_tokenizer(str(tmp_path / "vocab.txt"))


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_encode_array_matches_encode(name):
    tokenizer = load_tokenizer(TOKENIZERS[name])
    text = "To be, or not to be <|endoftext|> 春眠不觉晓，处处闻啼鸟。\n\n  end"
    assert tokenizer.encode_array(text).tolist() == tokenizer.encode(text)


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_encode_batch_flat_matches_encode(name):
    tokenizer = load_tokenizer(TOKENIZERS[name])
    texts = ["To be, or not to be", "", "春眠不觉晓，处处闻啼鸟。<|endoftext|>", " \n\n  end " * 40]
    expected = [tokenizer.encode(text) for text in texts]
    # int64 by default, and the little-endian file dtypes that preprocessing requests.
    for dtype in (np.int64, np.dtype("<u2") if tokenizer.vocab_size <= 65536 else np.dtype("<i4")):
        ids, lengths = tokenizer.encode_batch_flat(texts, dtype)
        assert ids.dtype == dtype
        assert lengths.tolist() == [len(item) for item in expected]
        assert ids.tolist() == [token for item in expected for token in item]


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_encode_batch_flat_empty_batch(name):
    ids, lengths = load_tokenizer(TOKENIZERS[name]).encode_batch_flat([])
    assert len(ids) == 0
    assert len(lengths) == 0


@pytest.mark.parametrize("previous", [None, "true"])
def test_hf_batch_restores_parallelism_setting(monkeypatch, previous):
    if previous is None:
        monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    else:
        monkeypatch.setenv("TOKENIZERS_PARALLELISM", previous)
    load_tokenizer(TOKENIZERS["chatglm3"]).encode_batch_flat(["one text", "another text"])
    assert os.environ.get("TOKENIZERS_PARALLELISM") == previous


def test_registered_name_without_bundled_tokenizer():
    with pytest.raises(TokenizerError) as error:
        load_tokenizer("bigscience/bloom-7b1")
    message = str(error.value)
    assert "'bigscience/bloom-7b1' is a registered model name, but fleetlm bundles no tokenizer for it" in message
    assert "pass the path of that checkpoint's tokenizer file (tokenizer.model, tokenizer.json or *.tiktoken)" in message
    assert "neither" not in message


def test_unknown_name_not_called_registered():
    with pytest.raises(TokenizerError) as error:
        load_tokenizer("no-such-org/no-such-model")
    assert "is neither an existing file or directory nor a registered model name" in str(error.value)


def test_every_registered_name_resolves_or_names_the_gap():
    from fleetlm.models.registry import MODEL_REGISTRY
    from fleetlm.tokenizer import TOKENIZER_FILES_BY_MODEL_NAME

    for name in MODEL_REGISTRY:
        if name in TOKENIZER_FILES_BY_MODEL_NAME:
            tokenizer = load_tokenizer(name)
            assert tokenizer.path == TOKENIZER_FILES_BY_MODEL_NAME[name], name
            continue
        with pytest.raises(TokenizerError, match="is a registered model name, but fleetlm bundles no tokenizer"):
            load_tokenizer(name)


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_special_token_text_stays_ordinary(name):
    # Web text can contain "</s>" or "<|endoftext|>"; only --append_eos may put EOS ids into the data.
    tokenizer = load_tokenizer(TOKENIZERS[name])
    text = "a <s> b </s> c <unk> d <|endoftext|> e"
    ids, _ = tokenizer.encode_batch_flat([text])
    assert tokenizer.eos_token_id not in ids.tolist()
    assert tokenizer.eos_token_id not in tokenizer.encode(text)
