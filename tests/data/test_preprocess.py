"""Tokenizing corpora into token files: round trips, worker independence and rejected input."""

import gzip
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import zstandard

from conftest import POETRY_DIR, REPO_ROOT, SHAKESPEARE_DIR, TOKENIZERS
from fleetlm.data import DataError
from fleetlm.data.indexed_dataset import open_token_documents
from fleetlm.data.preprocess import tokenize_corpus
from fleetlm.tokenizer import load_tokenizer

PLAYS = ["hamlet_gut.txt", "macbeth_gut.txt", "tempest_gut.txt"]


def expected_documents(input_dir: str) -> list[str]:
    """Read the documents of a corpus folder with plain file and json calls, in sorted path order."""
    documents = []
    for name in sorted(os.listdir(input_dir)):
        path = os.path.join(input_dir, name)
        if name.endswith(".txt"):
            with open(path, encoding="utf-8") as handle:
                documents.append(handle.read())
        elif name.endswith(".json"):
            with open(path, encoding="utf-8") as handle:
                documents.extend("\n".join(record["paragraphs"]) for record in json.load(handle))
    return [document for document in documents if document.strip()]


@pytest.fixture(scope="module")
def mixed_corpus(tmp_path_factory) -> str:
    """Three plays and both poetry files in one folder: English and Chinese, .txt and .json."""
    corpus = tmp_path_factory.mktemp("mixed")
    for name in PLAYS:
        shutil.copy(os.path.join(SHAKESPEARE_DIR, name), corpus / name)
    for name in ("ci.song.0.json", "lunyu.json"):
        shutil.copy(os.path.join(POETRY_DIR, name), corpus / name)
    return str(corpus)


@pytest.mark.parametrize("tokenizer_name", sorted(TOKENIZERS))
def test_round_trip_every_tokenizer(tokenizer_name, mixed_corpus, tmp_path):
    prefix = str(tmp_path / "out")
    stats = tokenize_corpus(mixed_corpus, TOKENIZERS[tokenizer_name], prefix, json_keys=["paragraphs"])
    expected = expected_documents(mixed_corpus)
    tokenizer = load_tokenizer(TOKENIZERS[tokenizer_name])
    documents = open_token_documents(prefix)

    assert stats.documents_written == len(expected) == 3 + 1000 + 20
    assert documents.num_documents == len(expected)
    assert documents.num_tokens == stats.tokens_written
    for index, text in enumerate(expected):
        assert tokenizer.decode(documents.document(index).tolist()) == text, f"document {index} differs"


def test_append_eos_adds_one_token(tmp_path):
    tokenizer = load_tokenizer(TOKENIZERS["gpt2"])
    plain, with_eos = str(tmp_path / "plain"), str(tmp_path / "eos")
    tokenize_corpus(POETRY_DIR, TOKENIZERS["gpt2"], plain, json_keys=["paragraphs"])
    tokenize_corpus(POETRY_DIR, TOKENIZERS["gpt2"], with_eos, json_keys=["paragraphs"], append_eos=True)
    plain_docs, eos_docs = open_token_documents(plain), open_token_documents(with_eos)

    assert np.array_equal(eos_docs.doc_length, plain_docs.doc_length + 1)
    assert np.array_equal(eos_docs.document(7)[:-1], plain_docs.document(7))
    assert eos_docs.document(7)[-1] == tokenizer.eos_token_id == 50256


def test_workers_write_identical_bytes(tmp_path):
    outputs = {}
    for workers in (1, 2, 4):
        prefix = str(tmp_path / f"w{workers}")
        tokenize_corpus(POETRY_DIR, TOKENIZERS["qwen"], prefix, json_keys=["paragraphs"], append_eos=True,
                        workers=workers)
        with open(prefix + ".bin", "rb") as bin_file, open(prefix + ".idx", "rb") as idx_file:
            outputs[workers] = (bin_file.read(), idx_file.read())
    assert outputs[1][0] == outputs[2][0] == outputs[4][0]
    assert outputs[1][1] == outputs[2][1] == outputs[4][1]


def test_qwen_vocab_stored_as_int32(tmp_path):
    prefix = str(tmp_path / "qwen")
    # Special-token text in a document is encoded as ordinary text, so append_eos supplies the only id
    # above 65,535 here: 151643, which must survive unchanged.
    tokenize_corpus(POETRY_DIR, TOKENIZERS["qwen"], prefix, json_keys=["paragraphs"], append_eos=True)
    documents = open_token_documents(prefix)

    assert documents.dtype == np.int32
    assert int(documents.tokens.max()) == 151643
    assert documents.document(0)[-1] == 151643
    assert os.path.getsize(prefix + ".bin") == 4 * documents.num_tokens


def test_gpt2_vocab_stored_as_uint16(shakespeare_gpt2):
    assert open_token_documents(shakespeare_gpt2).dtype == np.uint16


def test_compressed_jsonl_matches_plain(tmp_path):
    records = [{"text": f"line {i}: \u6625\u7720\u4e0d\u89c9\u6653 {'x' * i}"} for i in range(50)]
    body = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records).encode("utf-8")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "a.jsonl").write_bytes(body)
    (tmp_path / "gz").mkdir()
    (tmp_path / "gz" / "a.jsonl.gz").write_bytes(gzip.compress(body))
    (tmp_path / "zst").mkdir()
    (tmp_path / "zst" / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(body))

    contents = []
    for kind in ("plain", "gz", "zst"):
        prefix = str(tmp_path / f"out_{kind}")
        tokenize_corpus(str(tmp_path / kind), TOKENIZERS["mistral-spm"], prefix)
        contents.append(open(prefix + ".bin", "rb").read())
    assert contents[0] == contents[1] == contents[2]
    tokenizer = load_tokenizer(TOKENIZERS["mistral-spm"])
    assert tokenizer.decode(open_token_documents(str(tmp_path / "out_zst")).document(49)) == records[49]["text"]


def test_several_json_keys_joined(tmp_path):
    (tmp_path / "in.jsonl").write_text(json.dumps({"title": "T", "body": ["a", "b"]}) + "\n", encoding="utf-8")
    prefix = str(tmp_path / "out")
    tokenize_corpus(str(tmp_path / "in.jsonl"), TOKENIZERS["gpt2"], prefix, json_keys=["title", "body"])
    tokenizer = load_tokenizer(TOKENIZERS["gpt2"])
    assert tokenizer.decode(open_token_documents(prefix).document(0)) == "T\na\nb"


def test_empty_documents_skipped_and_counted(tmp_path):
    lines = [{"text": "one"}, {"text": ""}, {"text": "  \n "}, {"text": "two"}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + "\n", encoding="utf-8")
    stats = tokenize_corpus(str(tmp_path / "in.jsonl"), TOKENIZERS["gpt2"], str(tmp_path / "out"))
    assert stats.documents_written == 2
    # Two empty texts and the trailing blank line.
    assert stats.empty_skipped == 3


def write_jsonl(path, lines: list[bytes]) -> str:
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return str(path)


def assert_no_output(prefix: str) -> None:
    directory = os.path.dirname(prefix)
    leftovers = [name for name in os.listdir(directory) if name.startswith(("out", ".out"))]
    assert leftovers == []


def test_invalid_utf8_reports_line_and_offset(tmp_path):
    good = b'{"text": "fine"}'
    path = write_jsonl(tmp_path / "bad.jsonl", [good, b'{"text": "caf\xe9"}'])
    prefix = str(tmp_path / "out")
    with pytest.raises(DataError) as error:
        tokenize_corpus(path, TOKENIZERS["gpt2"], prefix)
    message = str(error.value)
    assert "invalid UTF-8" in message
    assert "bad.jsonl, line 2" in message
    # Line 2 starts at byte 17; the bad byte is 13 bytes into it.
    assert f"byte offset {len(good) + 1 + 13}" in message
    assert "--skip_invalid" in message
    assert_no_output(prefix)


def test_invalid_json_reports_line_and_offset(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [b'{"text": "a"}', b'{"text": "b"}', b'{"text": "c",}'])
    with pytest.raises(DataError) as error:
        tokenize_corpus(path, TOKENIZERS["gpt2"], str(tmp_path / "out"))
    message = str(error.value)
    assert "invalid JSON" in message
    assert "line 3" in message
    assert f"byte offset {14 + 14 + 13}" in message
    assert_no_output(str(tmp_path / "out"))


def test_invalid_json_array_file(tmp_path):
    (tmp_path / "bad.json").write_text('[{"paragraphs": ["a"]},\n {"paragraphs": ["b"]]', encoding="utf-8")
    with pytest.raises(DataError, match=r"invalid JSON in .*bad\.json, line 2"):
        tokenize_corpus(str(tmp_path / "bad.json"), TOKENIZERS["gpt2"], str(tmp_path / "out"), json_keys=["paragraphs"])


def test_missing_key_reports_line(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [b'{"text": "a"}', b'{"content": "b"}'])
    with pytest.raises(DataError) as error:
        tokenize_corpus(path, TOKENIZERS["gpt2"], str(tmp_path / "out"))
    message = str(error.value)
    assert "line 2" in message
    assert "no key 'text'" in message
    assert "['content']" in message
    assert "--json_key" in message


def test_list_with_non_string_item_names_the_item(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [b'{"text": ["a", "b"]}', b'{"text": ["a", {"b": 1}]}'])
    with pytest.raises(DataError, match=r"line 2, byte offset 21: key 'text' is a list whose item 1 is a dict \(\{\"b\": 1\}\), "
                                        r"expected a string"):
        tokenize_corpus(path, TOKENIZERS["gpt2"], str(tmp_path / "out"))


def test_wrong_value_type_rejected(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [b'{"text": 12}'])
    with pytest.raises(DataError, match="key 'text' has a value of type int, expected a string or a list of strings"):
        tokenize_corpus(path, TOKENIZERS["gpt2"], str(tmp_path / "out"))


def test_skip_invalid_counts_records(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [b'{"text": "a"}', b'{"text": "\xff"}', b'not json', b'{"x": 1}',
                                               b'{"text": "b"}'])
    stats = tokenize_corpus(path, TOKENIZERS["gpt2"], str(tmp_path / "out"), skip_invalid=True, workers=2)
    assert stats.invalid_skipped == 3
    assert stats.documents_written == 2


def test_empty_input_leaves_no_files(tmp_path):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    prefix = str(tmp_path / "out")
    with pytest.raises(DataError, match="no documents to write: 0 records read"):
        tokenize_corpus(str(tmp_path / "empty.jsonl"), TOKENIZERS["gpt2"], prefix)
    assert_no_output(prefix)


def test_directory_without_corpus_files(tmp_path):
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(DataError, match="no .jsonl, .json or .txt files under"):
        tokenize_corpus(str(tmp_path), TOKENIZERS["gpt2"], str(tmp_path / "out"))


def test_missing_input_path(tmp_path):
    with pytest.raises(DataError, match="input path .*nowhere.* does not exist"):
        tokenize_corpus(str(tmp_path / "nowhere"), TOKENIZERS["gpt2"], str(tmp_path / "out"))


def test_append_eos_without_eos_token(tmp_path):
    # ChatGLM3's tokenizer.json alone: its EOS token is named only in tokenizer_config.json.
    shutil.copy(TOKENIZERS["chatglm3"], tmp_path / "tokenizer.json")
    with pytest.raises(DataError) as error:
        tokenize_corpus(POETRY_DIR, str(tmp_path / "tokenizer.json"), str(tmp_path / "out"),
                        json_keys=["paragraphs"], append_eos=True)
    message = str(error.value)
    assert "--append_eos" in message
    assert "has no EOS token" in message


def run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)


def test_cli_error_is_one_line(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [b'{"text": "a"}', b'{"txt": "b"}'])
    result = run_tool("data_tools/create_pretraining_data.py", "--tokenizer_name_or_path", TOKENIZERS["gpt2"],
                      "--input_path", path, "--output_prefix", str(tmp_path / "out"))
    assert result.returncode == 1
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1
    assert "Traceback" not in result.stderr
    assert "line 2" in error_lines[0]


def test_cli_summary_line(tmp_path):
    result = run_tool("data_tools/create_pretraining_data.py", "--model_name_or_path", TOKENIZERS["gpt2"],
                      "--input_path", POETRY_DIR, "--json_key", "paragraphs", "--output_prefix", str(tmp_path / "out"),
                      "--data_format", "JSON", "--data_impl", "mmap", "--append_eos", "--workers", "2")
    assert result.returncode == 0, result.stderr
    assert "documents read 1020, empty documents skipped 0" in result.stdout
    assert "tokens written" in result.stdout


def test_cli_unknown_tokenizer(tmp_path):
    result = run_tool("data_tools/create_pretraining_data.py", "--tokenizer_name_or_path", "no-such-model",
                      "--input_path", POETRY_DIR, "--output_prefix", str(tmp_path / "out"))
    assert result.returncode == 1
    assert "tokenizer not found: 'no-such-model'" in result.stderr


def read_outputs(prefix: str) -> tuple[bytes, bytes]:
    with open(prefix + ".bin", "rb") as bin_file, open(prefix + ".idx", "rb") as idx_file:
        return bin_file.read(), idx_file.read()


def test_block_and_task_size_do_not_change_output(tmp_path, monkeypatch):
    # Tiny reads cut the .jsonl and .json files into many blocks and tasks; a reference run keeps the defaults.
    from fleetlm.data import corpus, preprocess

    lines = [json.dumps({"text": "\u6625" * (i % 7) + f" line {i} " * (i % 50)}, ensure_ascii=False) for i in range(400)]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text("\n".join(lines), encoding="utf-8")
    (tmp_path / "in" / "b.json").write_text(json.dumps([{"text": f"element {i}"} for i in range(50)]), encoding="utf-8")
    reference = str(tmp_path / "reference")
    tokenize_corpus(str(tmp_path / "in"), TOKENIZERS["gpt2"], reference, append_eos=True)

    monkeypatch.setattr(corpus, "JSONL_BLOCK_BYTES", 100)
    monkeypatch.setattr(corpus, "JSON_BLOCK_ELEMENTS", 3)
    monkeypatch.setattr(preprocess, "TASK_BYTES", 500)
    for workers in (1, 3):
        prefix = str(tmp_path / f"small_blocks_{workers}")
        stats = tokenize_corpus(str(tmp_path / "in"), TOKENIZERS["gpt2"], prefix, append_eos=True, workers=workers)
        # Lines 0 and 350 have empty text.
        assert (stats.documents_read, stats.empty_skipped, stats.documents_written) == (450, 2, 448)
        assert read_outputs(prefix) == read_outputs(reference)


def test_error_in_later_block_located(tmp_path, monkeypatch):
    from fleetlm.data import corpus

    monkeypatch.setattr(corpus, "JSONL_BLOCK_BYTES", 64)
    good = b'{"text": "fine"}'
    path = write_jsonl(tmp_path / "bad.jsonl", [good] * 20 + [b'{"text": "x",}'])
    for workers in (1, 2):
        with pytest.raises(DataError) as error:
            tokenize_corpus(path, TOKENIZERS["gpt2"], str(tmp_path / "out"), workers=workers)
        # The bad line starts at 20 * 17 bytes; json reports the error at the closing brace, 13 bytes in.
        assert f"bad.jsonl, line 21, byte offset {20 * 17 + 13}" in str(error.value)
    assert_no_output(str(tmp_path / "out"))


def test_first_error_in_file_order_for_any_workers(tmp_path):
    # a.jsonl has an invalid line; b.json cannot be parsed at all and is read later. Every worker
    # count reports the error of a.jsonl, the first in file order.
    write_jsonl(tmp_path / "a.jsonl", [b'{"text": "a"}'] * 3000 + [b"not json"])
    (tmp_path / "b.json").write_text('[{"text": "b"},', encoding="utf-8")
    for workers in (1, 2, 4):
        with pytest.raises(DataError, match=r"a\.jsonl, line 3001"):
            tokenize_corpus(str(tmp_path), TOKENIZERS["gpt2"], str(tmp_path / "out"), workers=workers)


def test_skip_invalid_counts_same_for_any_workers(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [b'{"text": "a"}', b"not json", b'{"x": 1}', b""] * 500)
    (tmp_path / "b.json").write_text('[{"text": "b"},', encoding="utf-8")
    counts = []
    for workers in (1, 2):
        stats = tokenize_corpus(str(tmp_path), TOKENIZERS["gpt2"], str(tmp_path / f"out{workers}"),
                                skip_invalid=True, workers=workers)
        counts.append((stats.documents_read, stats.empty_skipped, stats.invalid_skipped, stats.documents_written))
    # 1,000 invalid lines and the unparsable b.json, which counts as one invalid record but no document read.
    assert counts[0] == counts[1] == (2000, 500, 1001, 500)


def test_one_worker_runs_without_pool(tmp_path, monkeypatch):
    from fleetlm.data import preprocess

    def no_pool(*args, **kwargs):
        raise AssertionError("workers=1 must not start processes")

    monkeypatch.setattr(preprocess.multiprocessing, "get_context", no_pool)
    stats = tokenize_corpus(POETRY_DIR, TOKENIZERS["gpt2"], str(tmp_path / "out"), json_keys=["paragraphs"])
    assert stats.documents_written == 1020


@pytest.mark.skipif(sys.platform != "linux", reason="workers fork only where the platform has fork")
def test_forked_workers_reuse_parent_tokenizer(tmp_path, monkeypatch):
    from fleetlm.data import preprocess

    calls = tmp_path / "calls.txt"

    def counting_load(path):
        with open(calls, "a") as handle:
            handle.write(f"{os.getpid()}\n")
        return load_tokenizer(path)

    monkeypatch.setattr(preprocess, "load_tokenizer", counting_load)
    tokenize_corpus(POETRY_DIR, TOKENIZERS["qwen"], str(tmp_path / "out"), json_keys=["paragraphs"], workers=2)
    # Only the main process loaded the tokenizer; the two workers inherited it.
    assert calls.read_text().split() == [str(os.getpid())]
