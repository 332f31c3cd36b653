"""fleetlm.data.corpus: cutting files into record blocks keeps every record, line number and byte offset."""

import gzip
import io
import json
import os

import pytest

from fleetlm.data import corpus
from fleetlm.data.corpus import InvalidRecordError, iter_raw_records, iter_record_blocks


def records_by_readline(path: str, data: bytes) -> list[tuple]:
    """Cut ``data`` into (path, line, byte offset, payload) with readline, the reference for the block reader."""
    expected, offset = [], 0
    for number, line in enumerate(io.BytesIO(data), start=1):
        payload = line[3:] if number == 1 and line.startswith(b"\xef\xbb\xbf") else line
        expected.append((path, number, offset + len(line) - len(payload), payload))
        offset += len(line)
    return expected


def jsonl_body(trailing_newline: bool, bom: bool) -> bytes:
    lines = [json.dumps({"text": "x" * (i * 37 % 300) + "\u6625"}, ensure_ascii=i % 2 == 0).encode() for i in range(60)]
    # A blank line, a whitespace line and a line longer than several blocks.
    lines[10], lines[11], lines[12] = b"", b"  \r", json.dumps({"text": "long " * 200}).encode()
    body = b"\n".join(lines) + (b"\n" if trailing_newline else b"")
    return (b"\xef\xbb\xbf" if bom else b"") + body


@pytest.mark.parametrize("block_bytes", [1, 7, 64, 1 << 20])
@pytest.mark.parametrize("trailing_newline, bom", [(True, False), (False, True)])
def test_jsonl_blocks_match_readline(tmp_path, monkeypatch, block_bytes, trailing_newline, bom):
    monkeypatch.setattr(corpus, "JSONL_BLOCK_BYTES", block_bytes)
    data = jsonl_body(trailing_newline, bom)
    path = tmp_path / "in.jsonl"
    path.write_bytes(data)

    blocks = list(iter_record_blocks([str(path)]))
    records = [(r.path, r.line, r.offset, r.payload) for block in blocks for r in block.records()]

    assert records == records_by_readline(str(path), data)
    assert b"".join(block.payload for block in blocks) == data
    if block_bytes == 1 << 20:
        # One read covers the whole file; a last line without a line break comes as a block of its own.
        assert len(blocks) == (1 if trailing_newline else 2)


def test_gzip_blocks_count_decompressed_offsets(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "JSONL_BLOCK_BYTES", 50)
    data = jsonl_body(trailing_newline=True, bom=False)
    path = tmp_path / "in.jsonl.gz"
    path.write_bytes(gzip.compress(data))

    records = [(r.path, r.line, r.offset, r.payload) for r in iter_raw_records([str(path)])]

    assert records == records_by_readline(str(path), data)


def test_truncated_gzip_names_offset(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "JSONL_BLOCK_BYTES", 1000)
    data = jsonl_body(trailing_newline=True, bom=False) * 20
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(gzip.compress(data)[:-200])

    with pytest.raises(corpus.DataError, match=r"cannot read .*cut\.jsonl\.gz.* after byte offset \d+"):
        list(iter_record_blocks([str(path)]))


def test_json_array_blocks_number_elements(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "JSON_BLOCK_ELEMENTS", 4)
    (tmp_path / "a.json").write_text(json.dumps([{"text": str(i)} for i in range(10)]), encoding="utf-8")

    blocks = list(iter_record_blocks([str(tmp_path / "a.json")]))
    records = [record for block in blocks for record in block.records()]

    assert [block.first_line for block in blocks] == [1, 5, 9]
    assert [record.line for record in records] == list(range(1, 11))
    assert [record.payload["text"] for record in records] == [str(i) for i in range(10)]


def test_invalid_json_file_becomes_block(tmp_path):
    (tmp_path / "bad.json").write_text('[{"text": "a"},', encoding="utf-8")
    path = str(tmp_path / "bad.json")

    blocks = list(iter_record_blocks([path]))

    assert [block.kind for block in blocks] == ["invalid"]
    assert "invalid JSON in" in blocks[0].payload
    with pytest.raises(InvalidRecordError, match="invalid JSON in"):
        list(iter_raw_records([path]))
    assert [record.kind for record in iter_raw_records([path], skip_invalid=True)] == ["invalid"]


def test_zstd_frames_and_truncation(tmp_path):
    import zstandard

    text = "".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(5000)).encode()
    frame = zstandard.ZstdCompressor().compress(text)
    whole = tmp_path / "two_frames.jsonl.zst"
    whole.write_bytes(frame + frame)
    with corpus.open_binary(str(whole)) as handle:
        assert handle.read() == text + text

    cut = tmp_path / "cut.jsonl.zst"
    cut.write_bytes(frame[: len(frame) // 2])
    with pytest.raises(EOFError, match="truncated"):
        with corpus.open_binary(str(cut)) as handle:
            handle.read()
    with pytest.raises(corpus.DataError, match="the file is truncated or damaged; copy or download it again"):
        list(iter_raw_records([str(cut)]))


@pytest.mark.parametrize("error, hint", [
    (PermissionError(13, "Permission denied"), "check the file's permissions"),
    (OSError(5, "Input/output error"), "check the file system it is on"),
    (EOFError("Compressed file ended before the end-of-stream marker was reached"), "truncated or damaged"),
])
def test_read_error_hint(error, hint):
    # Tests run as root here, which reads files without read permission, so the hint is checked directly.
    assert hint in corpus._read_error_hint(error)


def test_unpaired_surrogate_rejected_with_location(tmp_path):
    path = tmp_path / "surrogate.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "bad \\ud800 text"}\n')
    records = list(iter_raw_records([str(path)]))
    assert corpus.extract_text(records[0], ["text"]) == "fine"
    with pytest.raises(InvalidRecordError, match=r"line 2.*unpaired UTF-16 surrogate \(\\ud800\).*--skip_invalid"):
        corpus.extract_text(records[1], ["text"])


PLAIN_LINES = [
    '{"text": "To be, or not to be", "title": "Hamlet"}',
    '{"title": "静夜思", "text": "床前明月光，\\n疑是地上霜。"}',
    '{"text": "", "title": ""}',
    '{"text": "tab\\there \\"quoted\\" \\u00e9 \\u4e2d", "title": "escapes"}',
]
# Lines the fast path hands back to extract_text, each with the reason.
OTHER_LINES = {
    "padded": ' {"text": "a", "title": "b"} ',
    "crlf": '{"text": "a", "title": "b"}\r',
    "blank": "",
    "list value": '{"text": ["a", "b"], "title": "b"}',
    "number value": '{"text": 5, "title": "b"}',
    "missing key": '{"title": "b"}',
    "array": '["a"]',
    "two values": '{"text": "a", "title": "b"} {"text": "c", "title": "d"}',
    "broken": '{"text": "a", "title": ',
    "unpaired surrogate": '{"text": "\\ud800", "title": "b"}',
    "surrogate pair": '{"text": "\\ud83d\\ude00", "title": "b"}',
}


def _block(lines: list, first_offset: int = 0, prefix: bytes = b"") -> corpus.RecordBlock:
    return corpus.RecordBlock("jsonl", "corpus.jsonl", 1, first_offset, prefix + "\n".join(lines).encode() + b"\n")


@pytest.mark.parametrize("keys", [["text"], ["title", "text"]])
def test_plain_jsonl_texts_matches_extract_text(keys):
    block = _block(PLAIN_LINES)
    expected = [corpus.extract_text(record, keys) for record in block.records()]
    assert corpus.plain_jsonl_texts(block, keys) == expected


@pytest.mark.parametrize("reason", sorted(OTHER_LINES))
def test_plain_jsonl_texts_declines_other_lines(reason):
    assert corpus.plain_jsonl_texts(_block(PLAIN_LINES + [OTHER_LINES[reason]]), ["text", "title"]) is None


def test_plain_jsonl_declines_bom_and_bad_utf8():
    assert corpus.plain_jsonl_texts(_block(PLAIN_LINES, prefix=corpus._UTF8_BOM), ["text"]) is None
    # A byte order mark in the middle of a file is not stripped by extract_text either: that line is invalid.
    assert corpus.plain_jsonl_texts(_block(PLAIN_LINES, first_offset=10, prefix=corpus._UTF8_BOM), ["text"]) is None
    bad = corpus.RecordBlock("jsonl", "corpus.jsonl", 1, 0, b'{"text": "\xff"}\n')
    assert corpus.plain_jsonl_texts(bad, ["text"]) is None


def test_plain_jsonl_declines_lines_joined_into_json():
    # Three invalid lines that make three objects if the block were parsed as one array.
    lines = ['{"text": [{"text": "a"}', '{"text": "b"}]}', '{"text": "c"},{"text": "d"}']
    assert corpus.plain_jsonl_texts(_block(lines), ["text"]) is None


def test_named_pipe_with_corpus_suffix_skipped(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "a"}\n')
    os.mkfifo(tmp_path / "pipe.txt")
    assert corpus.list_input_files(str(tmp_path)) == [str(tmp_path / "a.jsonl")]


def test_deeply_nested_json_is_invalid_record(tmp_path):
    path = tmp_path / "deep.jsonl"
    path.write_text('{"text": "x", "d": ' + "[" * 100000 + "]" * 100000 + "}\n")
    (record,) = list(iter_raw_records([str(path)]))
    with pytest.raises(InvalidRecordError, match="line 1, byte offset 0 nests JSON arrays or objects too deeply"):
        corpus.extract_text(record, ["text"])
