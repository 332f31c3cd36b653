"""Readers for raw text corpora: ``.jsonl``, ``.json`` arrays and ``.txt`` files, plain or compressed.

Reading has two steps, so that the expensive one can run in worker processes.
``iter_record_blocks`` (main process) cuts files into blocks of whole records and keeps the
line number and byte offset where each block starts. ``RecordBlock.records`` and ``extract_text``
(any process) split a block into records and decode and parse each into its document text.
Every error names the file, the line and the byte offset. For a compressed file the offset
counts bytes of the decompressed stream.
"""

import gzip
import io
import itertools
import json
import operator
import os
from typing import Iterator, NamedTuple, Sequence, Union

from fleetlm.data.errors import DataError
from fleetlm.utils.log import get_logger

logger = get_logger(__name__)

DOCUMENT_SUFFIXES = (".jsonl", ".json", ".txt")
COMPRESSION_SUFFIXES = ("", ".gz", ".zst", ".zstd")
_UTF8_BOM = b"\xef\xbb\xbf"

# A .jsonl file is read this many bytes at a time, and each read ends a block at its last line break.
JSONL_BLOCK_BYTES = 1 << 20
# Elements of a parsed .json array per block.
JSON_BLOCK_ELEMENTS = 1024


class InvalidRecordError(DataError):
    """One record that cannot be read; ``--skip_invalid`` skips and counts these instead of failing."""


class RawRecord(NamedTuple):
    """One document before decoding (a tuple, because one is made for every line of a corpus).

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


class RecordBlock(NamedTuple):
    """Consecutive records of one file, handed whole to a worker (a tuple, so that it pickles cheaply).

    ``payload`` is one of: whole lines (``jsonl``), the parsed array elements (``json``), the whole
    file (``txt``), or the message of a file that could not be parsed (``invalid``). The last line of
    a ``jsonl`` file may lack its line break, and a byte order mark at the start of the file is kept.
    ``first_line`` is the 1-based line, or array element for ``json``, of the first record, and
    ``first_offset`` is its byte offset.
    """

    kind: str
    path: str
    first_line: int
    first_offset: int
    payload: Union[bytes, list, str]

    def records(self) -> Iterator[RawRecord]:
        """Yield the records of the block in file order."""
        if self.kind == "jsonl":
            data, start, line = self.payload, 0, self.first_line
            while start < len(data):
                end = data.find(b"\n", start) + 1
                if end == 0:
                    end = len(data)
                record_start = start
                if self.first_offset + start == 0 and data.startswith(_UTF8_BOM):
                    # A byte order mark before the first line is not part of the record.
                    record_start += len(_UTF8_BOM)
                yield RawRecord("jsonl", self.path, line, self.first_offset + record_start, data[record_start:end])
                start, line = end, line + 1
        elif self.kind == "json":
            for number, element in enumerate(self.payload, start=self.first_line):
                yield RawRecord("json", self.path, number, 0, element)
        else:
            yield RawRecord(self.kind, self.path, self.first_line, self.first_offset, self.payload)


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
    def unreadable(error: OSError) -> None:
        raise DataError(f"cannot list {error.filename!r}: {error.strerror}; make it readable or move it out of "
                        f"--input_path {input_path!r}")

    for root, dirs, names in os.walk(input_path, onerror=unreadable):
        dirs.sort()
        for name in names:
            path = os.path.join(root, name)
            # A named pipe or device with a corpus suffix would block the reader forever.
            # PREFIX.meta.json beside token files written into the corpus directory is not a corpus file.
            kind = document_kind(path) and os.path.isfile(path) and not name.endswith(".meta.json")
            (files if kind else skipped).append(path)
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

        return io.BufferedReader(_ZstdReader(open(path, "rb"), zstandard.ZstdDecompressor()))
    return open(path, "rb")


class _ZstdReader(io.RawIOBase):
    """Decompress a .zst file frame by frame, raising EOFError when the last frame is cut short.

    zstandard's own ``stream_reader`` (0.25) stops quietly at the end of a truncated frame, which
    would turn a damaged file into silently shorter data.
    """

    _CHUNK = 1 << 20

    def __init__(self, raw, decompressor):
        self._raw = raw
        self._decompressor = decompressor
        self._frame = decompressor.decompressobj()
        self._in_frame = False  # True once the current frame has received input
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._pending:
            data = self._raw.read(self._CHUNK)
            if not data:
                if self._in_frame and not self._frame.eof:
                    raise EOFError("the zstd stream ends inside a frame (truncated file)")
                return 0
            self._pending = self._decompress(data)
        size = min(len(buffer), len(self._pending))
        buffer[:size] = self._pending[:size]
        self._pending = self._pending[size:]
        return size

    def _decompress(self, data: bytes) -> bytes:
        out = []
        while data:
            self._in_frame = True
            out.append(self._frame.decompress(data))
            if not self._frame.eof:
                break
            # A file may hold several frames: start a new one on the bytes after this frame.
            data = self._frame.unused_data
            self._frame = self._decompressor.decompressobj()
            self._in_frame = False
        return b"".join(out)

    def close(self) -> None:
        self._raw.close()
        super().close()


def _read_errors() -> tuple:
    # gzip raises BadGzipFile (an OSError) or EOFError on a damaged file, zstandard its own ZstdError.
    import zstandard

    return (OSError, EOFError, zstandard.ZstdError)


def _read_error_hint(error: BaseException) -> str:
    """Suggest the likely fix for a read error: permissions, the file system, or a damaged file."""
    if isinstance(error, PermissionError):
        return "check the file's permissions"
    if isinstance(error, IsADirectoryError):
        return "pass the directory itself as --input_path"
    if isinstance(error, OSError) and not isinstance(error, gzip.BadGzipFile) and error.errno is not None:
        return "check the file system it is on"
    return "the file is truncated or damaged; copy or download it again"


def _read_all(path: str) -> bytes:
    try:
        with open_binary(path) as handle:
            return handle.read()
    except _read_errors() as error:
        raise DataError(f"cannot read {path!r}: {error}; {_read_error_hint(error)}") from None


def iter_record_blocks(paths: Sequence[str], skip_invalid: bool = False) -> Iterator[RecordBlock]:
    """Yield the records of every file in order, as blocks.

    A ``.json`` file must be parsed whole to find its elements. When it holds invalid UTF-8 or
    JSON, one block of kind "invalid" carries the error message in its place, so that the caller
    raises it, or counts it under ``skip_invalid``, in file order. ``skip_invalid`` only adds a
    warning here. A file that cannot be read raises DataError at once.
    """
    for path in paths:
        kind = document_kind(path)
        if kind == "jsonl":
            yield from _iter_jsonl_blocks(path)
        elif kind == "txt":
            data = _read_all(path)
            yield RecordBlock("txt", path, 1, 0, data[len(_UTF8_BOM) :] if data.startswith(_UTF8_BOM) else data)
        else:
            try:
                elements = _parse_json_array(path)
            except InvalidRecordError as error:
                if skip_invalid:
                    logger.warning("skipping %s", error)
                yield RecordBlock("invalid", path, 0, 0, str(error))
                continue
            for start in range(0, len(elements), JSON_BLOCK_ELEMENTS):
                yield RecordBlock("json", path, start + 1, 0, elements[start : start + JSON_BLOCK_ELEMENTS])


def iter_raw_records(paths: Sequence[str], skip_invalid: bool = False) -> Iterator[RawRecord]:
    """Yield the records of every file in order.

    Invalid UTF-8 or JSON in a ``.json`` file raises InvalidRecordError here. With ``skip_invalid``
    the file is skipped with a warning instead, and one record of kind "invalid" is yielded so that
    the caller can count it.
    """
    for block in iter_record_blocks(paths, skip_invalid=skip_invalid):
        if block.kind == "invalid" and not skip_invalid:
            raise InvalidRecordError(block.payload)
        yield from block.records()


def _iter_jsonl_blocks(path: str) -> Iterator[RecordBlock]:
    line = 1
    offset = 0  # byte offset of the next block in the file
    consumed = 0  # bytes read without error, for the message of a damaged file
    parts: list[bytes] = []  # bytes read after the last line break so far
    try:
        with open_binary(path) as handle:
            while chunk := handle.read(JSONL_BLOCK_BYTES):
                consumed += len(chunk)
                cut = chunk.rfind(b"\n") + 1
                if cut == 0:
                    # No line ends in this read: keep reading.
                    parts.append(chunk)
                    continue
                parts.append(chunk[:cut])
                block = b"".join(parts)
                yield RecordBlock("jsonl", path, line, offset, block)
                line += block.count(b"\n")
                offset += len(block)
                parts = [chunk[cut:]]
    except _read_errors() as error:
        raise DataError(
            f"cannot read {path!r} after byte offset {consumed}: {error}; {_read_error_hint(error)}"
        ) from None
    last = b"".join(parts)
    if last:
        yield RecordBlock("jsonl", path, line, offset, last)


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
        except RecursionError:
            raise InvalidRecordError(
                f"{record.location()} nests JSON arrays or objects too deeply to parse; fix the line or pass "
                f"--skip_invalid to skip it"
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
    text = "\n".join(parts)
    try:
        # JSON escapes can spell unpaired UTF-16 surrogates ("\ud800"), which no tokenizer can encode.
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise InvalidRecordError(
            f"{record.location()}: the text contains an unpaired UTF-16 surrogate (\\u{ord(text[error.start]):04x}), "
            f"which is not valid Unicode; fix the record or pass --skip_invalid to skip it"
        ) from None
    return text


_JSON_DECODER = json.JSONDecoder()


def plain_jsonl_texts(block: RecordBlock, json_keys: Sequence[str]) -> Union[list[str], None]:
    """Return the text of every line of a ``jsonl`` block, or None if a line needs ``extract_text``.

    This is the common case of ``extract_text`` without its per-record work: UTF-8 lines, each
    one JSON object whose keys all hold strings. Empty strings are returned too. A block with
    anything else (a byte order mark, blank or padded lines, list values, an escape that may
    spell a surrogate, any error) gives None. The caller then reads its records one by one, which
    gives the same texts and locates the error. Each step maps a C function over the whole
    block, which takes a third less time than a Python loop over the lines.
    """
    data = block.payload
    if b"\\ud" in data or b"\\uD" in data or (block.first_offset == 0 and data.startswith(_UTF8_BOM)):
        return None
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    try:
        strings = list(map(bytes.decode, lines))
        parsed = list(map(_JSON_DECODER.raw_decode, strings))  # (value, end of the value) pairs
        # Each value ends at or before the end of its line, so equal sums mean every line is one value.
        if sum(map(operator.itemgetter(1), parsed)) != sum(map(len, strings)):
            return None
        values = list(map(operator.itemgetter(0), parsed))
        if set(map(type, values)) != {dict}:
            return None
        if len(json_keys) == 1:
            texts = list(map(operator.itemgetter(json_keys[0]), values))
            return texts if set(map(type, texts)) == {str} else None
        parts = list(map(operator.itemgetter(*json_keys), values))
        if set(map(type, itertools.chain.from_iterable(parts))) != {str}:
            return None
        return list(map("\n".join, parts))
    except (ValueError, KeyError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return None


def _field_text(field, key: str, record: RawRecord) -> str:
    if isinstance(field, str):
        return field
    if isinstance(field, list):
        for index, item in enumerate(field):
            if not isinstance(item, str):
                raise InvalidRecordError(
                    f"{record.location()}: key {key!r} is a list whose item {index} is a {type(item).__name__} "
                    f"({_shorten(item)}), expected a string; fix the record or pass --skip_invalid to skip it"
                )
        return "\n".join(field)
    raise InvalidRecordError(
        f"{record.location()}: key {key!r} has a value of type {type(field).__name__}, expected a string or a "
        f"list of strings; fix the record or pass --skip_invalid to skip it"
    )


def _shorten(value, limit: int = 40) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
