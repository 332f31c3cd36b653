"""Readers for raw text corpora: ``.jsonl``, ``.json`` arrays and ``.txt`` files, plain or compressed.

Reading has two steps, so that the expensive one can run in worker processes.
``iter_raw_records`` (main process) cuts files into records and keeps the byte offset of each.
``extract_text`` (any process) decodes and parses one record and returns its document text.
Every error names the file, the line and the byte offset. For a compressed file the offset
counts bytes of the decompressed stream.
"""

import gzip
import io
import json
import os
from typing import Iterator, NamedTuple, Sequence, Union

from fleetlm.data.errors import DataError
from fleetlm.utils.log import get_logger

logger = get_logger(__name__)

DOCUMENT_SUFFIXES = (".jsonl", ".json", ".txt")
COMPRESSION_SUFFIXES = ("", ".gz", ".zst", ".zstd")
_UTF8_BOM = b"\xef\xbb\xbf"


class InvalidRecordError(DataError):
    """One record that cannot be read; ``--skip_invalid`` skips and counts these instead of failing."""


class RawRecord(NamedTuple):
    """One document before decoding (a tuple, because batches of these are pickled to the workers).

    ``payload`` is the raw line (``jsonl``), the parsed array element (``json``) or the whole file
    (``txt``). ``line`` is 1-based; for a ``json`` array it is the element's 1-based position.
    """

    kind: str
    path: str
    line: int
    offset: int
    payload: Union[bytes, object]

    def location(self) -> str:
        if self.kind == "json":
            return f"{self.path}, array element {self.line}"
        return f"{self.path}, line {self.line}, byte offset {self.offset}"


def document_kind(path: str) -> str:
    """Return "jsonl", "json" or "txt" for a supported file name, "" for any other."""
    name = path.lower()
    for compression in COMPRESSION_SUFFIXES:
        if compression and not name.endswith(compression):
            continue
        stem = name[: len(name) - len(compression)]
        for suffix in DOCUMENT_SUFFIXES:
            if stem.endswith(suffix):
                return suffix[1:]
    return ""


def list_input_files(input_path: str) -> list[str]:
    """Return the corpus files at ``input_path``: the file itself, or every supported file below a directory.

    Directory entries are walked recursively and sorted by path, so the document order, and so the
    output bytes, do not depend on the file system's listing order.
    """
    if os.path.isfile(input_path):
        if not document_kind(input_path):
            raise DataError(
                f"unsupported input file {input_path!r}: expected .jsonl, .json or .txt, optionally "
                f"compressed as .gz or .zst"
            )
        return [input_path]
    if not os.path.isdir(input_path):
        raise DataError(f"input path {input_path!r} does not exist; pass a corpus file or a directory of them")
    files, skipped = [], []
    for root, dirs, names in os.walk(input_path):
        dirs.sort()
        for name in names:
            path = os.path.join(root, name)
            (files if document_kind(path) else skipped).append(path)
    if skipped:
        logger.warning("skipping %d files without a .jsonl/.json/.txt suffix under %s, e.g. %s",
                       len(skipped), input_path, sorted(skipped)[0])
    return sorted(files)


def open_binary(path: str) -> io.BufferedIOBase:
    """Open a corpus file for reading bytes, decompressing ``.gz`` and ``.zst`` on the fly."""
    name = path.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith((".zst", ".zstd")):
        import zstandard

        raw = open(path, "rb")
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
    return open(path, "rb")


def _read_errors() -> tuple:
    # gzip raises BadGzipFile (an OSError) or EOFError on a damaged file, zstandard its own ZstdError.
    import zstandard

    return (OSError, EOFError, zstandard.ZstdError)


def _read_all(path: str) -> bytes:
    try:
        with open_binary(path) as handle:
            return handle.read()
    except _read_errors() as error:
        raise DataError(f"cannot read {path!r}: {error}; check that the file is complete") from None


def iter_raw_records(paths: Sequence[str], skip_invalid: bool = False) -> Iterator[RawRecord]:
    """Yield the records of every file in order.

    A ``.json`` file must be parsed whole to find its elements, so invalid UTF-8 or JSON in it
    raises here. With ``skip_invalid`` the file is skipped with a warning instead, and one record
    of kind "invalid" is yielded so that the caller can count it.
    """
    for path in paths:
        kind = document_kind(path)
        if kind == "jsonl":
            yield from _iter_jsonl(path)
        elif kind == "txt":
            data = _read_all(path)
            yield RawRecord("txt", path, 1, 0, data[len(_UTF8_BOM) :] if data.startswith(_UTF8_BOM) else data)
        else:
            try:
                elements = _parse_json_array(path)
            except InvalidRecordError as error:
                if not skip_invalid:
                    raise
                logger.warning("skipping %s", error)
                yield RawRecord("invalid", path, 0, 0, str(error))
                continue
            for number, element in enumerate(elements, start=1):
                yield RawRecord("json", path, number, 0, element)


def _iter_jsonl(path: str) -> Iterator[RawRecord]:
    offset = 0
    try:
        with open_binary(path) as handle:
            for number, line in enumerate(handle, start=1):
                payload = line[len(_UTF8_BOM) :] if number == 1 and line.startswith(_UTF8_BOM) else line
                yield RawRecord("jsonl", path, number, offset + len(line) - len(payload), payload)
                offset += len(line)
    except _read_errors() as error:
        raise DataError(
            f"cannot read {path!r} after byte offset {offset}: {error}; check that the file is complete"
        ) from None


def _parse_json_array(path: str) -> list:
    data = _read_all(path)
    if data.startswith(_UTF8_BOM):
        data = data[len(_UTF8_BOM) :]
    text = _decode_utf8(data, path, base_line=1, base_offset=0)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        offset = len(text[: error.pos].encode("utf-8"))
        raise InvalidRecordError(
            f"invalid JSON in {path}, line {error.lineno}, byte offset {offset}: {error.msg}; "
            f"fix the file or pass --skip_invalid to skip it"
        ) from None
    if not isinstance(value, list):
        raise InvalidRecordError(
            f"{path} contains a JSON {type(value).__name__}, expected an array of objects; "
            f"use .jsonl (one object a line) for a stream of records"
        )
    return value


def _decode_utf8(data: bytes, path: str, base_line: int, base_offset: int) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = base_line + data.count(b"\n", 0, error.start)
        raise InvalidRecordError(
            f"invalid UTF-8 in {path}, line {line}, byte offset {base_offset + error.start}: "
            f"byte {data[error.start:error.start + 1]!r}; convert the file to UTF-8 or pass --skip_invalid"
        ) from None


def extract_text(record: RawRecord, json_keys: Sequence[str]) -> str:
    """Return the document text of a record, or raise InvalidRecordError with its location.

    The values of several keys are joined with newlines in the order given. A list of strings
    (such as the ``paragraphs`` of a poem) is joined with newlines too.
    """
    if record.kind == "txt":
        return _decode_utf8(record.payload, record.path, base_line=1, base_offset=0)
    if record.kind == "jsonl":
        line = _decode_utf8(record.payload, record.path, base_line=record.line, base_offset=record.offset)
        if not line or line.isspace():
            return ""
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            offset = record.offset + len(line[: error.pos].encode("utf-8"))
            raise InvalidRecordError(
                f"invalid JSON in {record.path}, line {record.line}, byte offset {offset}: {error.msg}; "
                f"fix the line or pass --skip_invalid to skip it"
            ) from None
    else:
        value = record.payload
    if not isinstance(value, dict):
        raise InvalidRecordError(
            f"{record.location()} is a JSON {type(value).__name__}, expected an object with the key(s) {list(json_keys)}"
        )
    parts = []
    for key in json_keys:
        if key not in value:
            raise InvalidRecordError(
                f"{record.location()} has no key {key!r} (keys present: {sorted(value)}); "
                f"choose the key(s) with --json_key or pass --skip_invalid"
            )
        parts.append(_field_text(value[key], key, record))
    return "\n".join(parts)


def _field_text(field, key: str, record: RawRecord) -> str:
    if isinstance(field, str):
        return field
    if isinstance(field, list) and all(isinstance(item, str) for item in field):
        return "\n".join(field)
    raise InvalidRecordError(
        f"{record.location()}: key {key!r} contains a {type(field).__name__}, expected a string or a list of strings"
    )


def iter_documents(input_path: str, json_keys: Sequence[str], skip_invalid: bool = False) -> Iterator[str]:
    """Yield the non-empty document texts under ``input_path`` in order, in this process."""
    for record in iter_raw_records(list_input_files(input_path), skip_invalid=skip_invalid):
        if record.kind == "invalid":
            continue
        try:
            text = extract_text(record, json_keys)
        except InvalidRecordError:
            if skip_invalid:
                continue
            raise
        if text.strip():
            yield text
