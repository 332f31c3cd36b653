"""Token files: the MMIDIDX ``.bin/.idx`` pair and PaddleNLP's older ``_ids.npy/_idx.npz`` pair.

``PREFIX.bin`` contains the token ids of every sequence back to back, in one integer dtype.
``PREFIX.idx`` describes them, little-endian, in the version-1 layout that Megatron-LM and
PaddleNLP read and write (``MMapIndexedDataset``):

======  ==========================  ==================================================
offset  field                       value
======  ==========================  ==================================================
0       magic, 9 bytes              ``b"MMIDIDX\\x00\\x00"``
9       version, uint64             1
17      dtype code, uint8           1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 8 uint16
18      sequence count, uint64      ``n``
26      document count, uint64      ``m + 1`` (the document index has a leading 0)
34      sizes, int32[n]             tokens in each sequence
..      pointers, int64[n]          byte offset of each sequence in ``.bin``
..      document index, int64[m+1]  first sequence of each document, then ``n``
======  ==========================  ==================================================

fleetlm writes one sequence per document, but reads files where a document spans several
sequences (PaddleNLP's ``--split_sentences``). The older pair stores the same data as
``_ids.npy`` (all tokens, one array) and ``_idx.npz`` with ``lens`` (int32 sequence sizes) and
``docs`` (int64 document index with the leading 0).

fleetlm also writes ``PREFIX.meta.json`` beside a pair when the caller supplies metadata (the
tokenizer and settings that made it, see ``IndexedDatasetWriter``). Readers never need it, since
PaddleNLP's files have none; ``merge_token_files`` uses it to reject inputs of different tokenizers.
"""

import contextlib
import json
import os
import re
import signal
import struct
import uuid
from typing import Callable, Iterable, Iterator, NamedTuple, Optional

import numpy as np

from fleetlm.data.errors import DataError
from fleetlm.utils.log import get_logger

logger = get_logger(__name__)

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_SIZE = 34

# dtype codes of the MMIDIDX header, as Megatron-LM and PaddleNLP number them. Codes 6 and 7 are
# floating point types, and the two projects disagree on which is float32, so they are not token data
# and are rejected.
DTYPE_BY_CODE = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    8: np.dtype(np.uint16),
}
CODE_BY_DTYPE = {dtype: code for code, dtype in DTYPE_BY_CODE.items()}


def token_dtype_for_vocab(vocab_size: int) -> np.dtype:
    """Return uint16 when every id of a ``vocab_size`` vocabulary fits in it, int32 otherwise.

    The choice depends on the tokenizer alone, not on the ids a corpus happens to use, so every
    file made with one tokenizer has the same dtype and the files can be merged or blended.
    """
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.int32)


def bin_path(prefix: str) -> str:
    return prefix + ".bin"


def idx_path(prefix: str) -> str:
    return prefix + ".idx"


def metadata_path(prefix: str) -> str:
    return prefix + ".meta.json"


def dataset_exists(prefix: str) -> bool:
    """Return whether ``prefix`` names an MMIDIDX pair or an older npy/npz pair."""
    mmap_pair = os.path.isfile(bin_path(prefix)) and os.path.isfile(idx_path(prefix))
    npy_pair = os.path.isfile(prefix + "_ids.npy") and os.path.isfile(prefix + "_idx.npz")
    return mmap_pair or npy_pair


# Temporary names are ".BASE.bin.PID.HEX8.tmp", and the same for .idx and .meta.json.
# train_tokenizer.py writes ".BASE.tokenizer.PID.HEX8.tmp.model" and ".vocab". The writer's
# process id lets a later run check whether the file can still be in use.
_TEMPORARY_NAME = r"\.{base}\.(?:bin|idx|meta\.json|tokenizer)\.(\d+)\.[0-9a-f]{{8}}\.tmp(?:\.model|\.vocab)?"


def temporary_name(prefix: str, kind: str) -> str:
    """Return a hidden, unique temporary path beside ``prefix`` for output ``kind``, naming this process."""
    directory, base = os.path.split(os.path.abspath(prefix))
    return os.path.join(directory, f".{base}.{kind}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def _process_is_running(pid: int) -> bool:
    """Return whether a process with id ``pid`` exists on this machine (signal 0 only checks)."""
    if pid <= 0:
        # Not an id a writer records; os.kill would address a process group, so keep the file.
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # the process exists and belongs to another user
    except OverflowError:
        return False  # larger than any process id
    return True


def remove_stale_temporary_files(prefix: str) -> list[str]:
    """Remove temporary files of ``prefix`` left by writers that no longer run; return their paths.

    A writer killed by SIGKILL or a power loss cannot remove its own temporary files. Files whose
    process is alive are kept, because another run may be writing them.
    NOTE: the process check covers this machine only. On a file system shared between machines, a
    file written by another machine is removed when no local process has that id.
    """
    directory = os.path.dirname(os.path.abspath(prefix))
    pattern = re.compile(_TEMPORARY_NAME.format(base=re.escape(os.path.basename(prefix))))
    removed = []
    for name in sorted(os.listdir(directory)):
        match = pattern.fullmatch(name)
        if match is None or _process_is_running(int(match.group(1))):
            continue
        path = os.path.join(directory, name)
        try:
            os.remove(path)
        except FileNotFoundError:
            continue  # another writer of the same prefix removed it first
        logger.warning("removed stale temporary file %s: process %s that wrote it is no longer running",
                       path, match.group(1))
        removed.append(path)
    return removed


@contextlib.contextmanager
def _stop_signals_blocked() -> Iterator[None]:
    """Hold back SIGINT and SIGTERM until the block ends, so that no stop request lands between renames.

    A signal that arrives meanwhile is delivered, and its handler runs, when the block ends.
    """
    if not hasattr(signal, "pthread_sigmask"):  # Windows
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _write_json_synced(path: str, record: dict) -> None:
    with open(path, "x", encoding="utf-8") as handle:
        json.dump(record, handle, indent=2, sort_keys=True)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())


class IndexedDatasetWriter:
    """Write a ``.bin/.idx`` pair that appears under its final name only once it is complete.

    Both files are written under temporary names in the output directory, synced to disk, and
    renamed at ``finalize``, the ``.idx`` last, so a reader never sees a partial pair. ``abort``
    (or leaving the ``with`` block on an exception) removes the temporary files. Temporary files of
    the same prefix that a killed writer left behind are removed when a new writer starts.

    With ``metadata``, ``finalize`` also writes ``PREFIX.meta.json``: the given fields plus
    ``token_dtype``, ``documents``, ``sequences`` and ``tokens``, renamed into place before the
    ``.idx``. Without it, a ``PREFIX.meta.json`` of an earlier pair is removed, since it would no
    longer describe the new one.
    """

    def __init__(self, prefix: str, dtype: np.dtype, metadata: Optional[dict] = None):
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        self.metadata = metadata
        if self.dtype not in CODE_BY_DTYPE:
            raise DataError(f"unsupported token dtype {self.dtype}; use one of {sorted(map(str, CODE_BY_DTYPE))}")
        directory = os.path.dirname(os.path.abspath(prefix))
        if not os.path.isdir(directory):
            raise DataError(f"output directory {directory!r} does not exist; create it or change --output_prefix")
        remove_stale_temporary_files(prefix)
        # Hidden, unique temporary names in the output directory, so the final rename stays on one file system.
        self._bin_tmp_path = temporary_name(prefix, "bin")
        self._idx_tmp_path = temporary_name(prefix, "idx")
        self._metadata_tmp_path = temporary_name(prefix, "meta.json")
        self._bin_file = open(self._bin_tmp_path, "xb")
        # Sizes and document ends of single documents collect in lists; merged files arrive as arrays.
        self._sizes: list[int] = []
        self._document_ends: list[int] = []
        self._size_parts: list[np.ndarray] = []
        self._document_end_parts: list[np.ndarray] = []
        self._num_sequences = 0
        self.num_documents = 0
        self.num_tokens = 0
        self._done = False

    def add_document(self, token_ids: np.ndarray) -> None:
        """Append one document stored as one sequence."""
        array = np.asarray(token_ids)
        if array.dtype != self.dtype:
            array = array.astype(self.dtype)
        self.add_document_bytes(array.tobytes(), len(array))

    def add_document_bytes(self, token_bytes: bytes, num_tokens: int) -> None:
        """Append one document already encoded as little-endian bytes of this writer's dtype."""
        self._bin_file.write(token_bytes)
        self._sizes.append(num_tokens)
        self._num_sequences += 1
        self._document_ends.append(self._num_sequences)
        self.num_documents += 1
        self.num_tokens += num_tokens

    def add_sequences(self, sizes: np.ndarray, document_index: np.ndarray, token_bytes: Iterable) -> None:
        """Append whole documents: their sizes, their document index, and their tokens.

        ``token_bytes`` contains bytes-like chunks: bytes, or arrays already in this file's dtype.
        """
        for chunk in token_bytes:
            self._bin_file.write(chunk)
        self._flush_lists()
        self._size_parts.append(np.asarray(sizes, dtype=np.int32))
        self._document_end_parts.append(np.asarray(document_index[1:], dtype=np.int64) + self._num_sequences)
        self._num_sequences += len(sizes)
        self.num_documents += len(document_index) - 1
        self.num_tokens += int(np.sum(sizes, dtype=np.int64))

    def _flush_lists(self) -> None:
        if self._sizes:
            self._size_parts.append(np.array(self._sizes, dtype=np.int32))
            self._document_end_parts.append(np.array(self._document_ends, dtype=np.int64))
            self._sizes, self._document_ends = [], []

    def finalize(self) -> None:
        """Write the index (and the metadata file) and move the files to their final names."""
        self._bin_file.flush()
        os.fsync(self._bin_file.fileno())
        self._bin_file.close()

        self._flush_lists()
        sizes = np.concatenate([np.zeros(0, np.int32)] + self._size_parts)
        pointers = np.zeros(len(sizes), dtype=np.int64)
        np.cumsum(sizes[:-1], dtype=np.int64, out=pointers[1:])
        pointers *= self.dtype.itemsize
        document_index = np.concatenate([np.zeros(1, np.int64)] + self._document_end_parts)
        with open(self._idx_tmp_path, "wb") as handle:
            handle.write(MAGIC)  # 9 bytes: format name, zero padded
            handle.write(struct.pack("<Q", VERSION))  # uint64: format version
            handle.write(struct.pack("<B", CODE_BY_DTYPE[self.dtype]))  # uint8: token dtype code
            handle.write(struct.pack("<Q", len(sizes)))  # uint64: sequence count
            handle.write(struct.pack("<Q", len(document_index)))  # uint64: document index length
            handle.write(sizes.tobytes(order="C"))  # int32[n]: tokens per sequence
            handle.write(pointers.tobytes(order="C"))  # int64[n]: byte offset of each sequence in .bin
            handle.write(document_index.tobytes(order="C"))  # int64[m+1]: first sequence of each document
            handle.flush()
            os.fsync(handle.fileno())

        if self.metadata is not None:
            record = dict(self.metadata, token_dtype=self.dtype.name, documents=self.num_documents,
                          sequences=len(sizes), tokens=self.num_tokens)
            _write_json_synced(self._metadata_tmp_path, record)

        targets = [bin_path(self.prefix), metadata_path(self.prefix), idx_path(self.prefix)]
        for target in targets:
            if os.path.isdir(target):
                raise DataError(f"{target} is a directory; remove it or choose another output prefix "
                                "(no output files were written)")
        with _stop_signals_blocked():
            # An older .idx goes first: if a later rename fails, the prefix has no index instead of
            # an index that describes another .bin.
            if os.path.exists(idx_path(self.prefix)):
                os.remove(idx_path(self.prefix))
            os.replace(self._bin_tmp_path, bin_path(self.prefix))
            if self.metadata is not None:
                os.replace(self._metadata_tmp_path, metadata_path(self.prefix))
            elif os.path.exists(metadata_path(self.prefix)):
                os.remove(metadata_path(self.prefix))
            os.replace(self._idx_tmp_path, idx_path(self.prefix))
            self._done = True

    def abort(self) -> None:
        """Remove the temporary files; the final names are never created."""
        if self._done:
            return
        if not self._bin_file.closed:
            self._bin_file.close()
        for path in (self._bin_tmp_path, self._idx_tmp_path, self._metadata_tmp_path):
            if os.path.exists(path):
                os.remove(path)
        self._done = True

    def __enter__(self) -> "IndexedDatasetWriter":
        return self

    def __exit__(self, exc_type, exc_value, traceback) -> None:
        if exc_type is not None:
            self.abort()


class TokenDocuments:
    """Read-only, memory-mapped token file: every document as a slice of one flat token array.

    Attributes:
        path: the prefix it was opened from.
        tokens: all token ids, memory-mapped, in the file's dtype.
        sizes: tokens in each sequence (int32).
        document_index: first sequence of each document, with the trailing sequence count (int64).
        doc_start: offset of each document's first token in ``tokens`` (int64).
        doc_length: tokens in each document (int64).
    """

    def __init__(self, path: str, tokens: np.ndarray, sizes: np.ndarray, document_index: np.ndarray):
        self.path = path
        self.tokens = tokens
        self.sizes = sizes
        self.document_index = document_index
        sequence_start = np.zeros(len(sizes) + 1, dtype=np.int64)
        np.cumsum(sizes, dtype=np.int64, out=sequence_start[1:])
        self.doc_start = sequence_start[document_index[:-1]]
        self.doc_length = sequence_start[document_index[1:]] - self.doc_start

    @property
    def dtype(self) -> np.dtype:
        return self.tokens.dtype

    @property
    def num_documents(self) -> int:
        return len(self.doc_length)

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def document(self, index: int) -> np.ndarray:
        """Return the token ids of document ``index`` as a view into the memory map."""
        if not 0 <= index < self.num_documents:
            raise IndexError(f"document {index} is out of range for {self.path!r} with {self.num_documents} documents")
        start = self.doc_start[index]
        return self.tokens[start : start + self.doc_length[index]]


def open_token_documents(prefix: str) -> TokenDocuments:
    """Open ``PREFIX.bin/.idx``, or ``PREFIX_ids.npy/_idx.npz`` when only that pair exists."""
    if os.path.isfile(idx_path(prefix)) or os.path.isfile(bin_path(prefix)):
        return _open_mmidx(prefix)
    if os.path.isfile(prefix + "_idx.npz") or os.path.isfile(prefix + "_ids.npy"):
        return _open_npy_pair(prefix)
    raise DataError(
        f"no token files for prefix {prefix!r}: expected {prefix}.bin and {prefix}.idx "
        f"(or {prefix}_ids.npy and {prefix}_idx.npz); run data_tools/create_pretraining_data.py first"
    )


def read_index_header(path: str) -> tuple[np.dtype, int, int]:
    """Return the dtype, sequence count and document-index length from an ``.idx`` header."""
    with open(path, "rb") as handle:
        header = handle.read(HEADER_SIZE)
    if len(header) < HEADER_SIZE or header[:9] != MAGIC:
        raise DataError(
            f"{path!r} is not an MMIDIDX index file: it does not start with the magic {MAGIC!r}; "
            f"rebuild it with data_tools/create_pretraining_data.py"
        )
    (version,) = struct.unpack("<Q", header[9:17])
    if version != VERSION:
        raise DataError(f"{path!r} has index version {version}; only version {VERSION} is supported")
    (code,) = struct.unpack("<B", header[17:18])
    if code not in DTYPE_BY_CODE:
        raise DataError(
            f"{path!r} has dtype code {code}, which is not an integer token dtype; "
            f"valid codes are {sorted(DTYPE_BY_CODE)}"
        )
    num_sequences, document_index_length = struct.unpack("<QQ", header[18:34])
    return DTYPE_BY_CODE[code], num_sequences, document_index_length


class _IndexArrays(NamedTuple):
    """The arrays of an ``.idx`` file, checked against its header but not yet against the ``.bin``."""

    dtype: np.dtype
    sizes: np.ndarray
    pointers: np.ndarray
    document_index: np.ndarray


def _read_mmidx_index(prefix: str) -> _IndexArrays:
    index_file, data_file = idx_path(prefix), bin_path(prefix)
    for path in (index_file, data_file):
        if not os.path.isfile(path):
            raise DataError(f"missing {path!r}: a token dataset needs both {prefix}.bin and {prefix}.idx")
    dtype, num_sequences, document_index_length = read_index_header(index_file)

    expected_idx_bytes = HEADER_SIZE + num_sequences * (4 + 8) + document_index_length * 8
    actual_idx_bytes = os.path.getsize(index_file)
    if actual_idx_bytes != expected_idx_bytes:
        raise DataError(
            f"{index_file!r} is {actual_idx_bytes} bytes but its header ({num_sequences} sequences, "
            f"{document_index_length} document index entries) needs {expected_idx_bytes}; the file is truncated "
            f"or corrupt, rebuild it"
        )
    index = np.memmap(index_file, dtype=np.uint8, mode="r")
    sizes = np.frombuffer(index, dtype=np.int32, count=num_sequences, offset=HEADER_SIZE)
    pointers = np.frombuffer(index, dtype=np.int64, count=num_sequences, offset=HEADER_SIZE + 4 * num_sequences)
    document_index = np.frombuffer(
        index, dtype=np.int64, count=document_index_length, offset=HEADER_SIZE + 12 * num_sequences
    )
    _check_document_index(index_file, document_index, num_sequences)
    return _IndexArrays(dtype, sizes, pointers, document_index)


def _pointers_are_sequential(index: _IndexArrays) -> bool:
    """Return whether the sequences lie back to back in ``.bin``, in index order, from byte 0."""
    expected_pointers = np.zeros(len(index.sizes), dtype=np.int64)
    np.cumsum(index.sizes[:-1], dtype=np.int64, out=expected_pointers[1:])
    return np.array_equal(index.pointers, expected_pointers * index.dtype.itemsize)


def _open_mmidx(prefix: str) -> TokenDocuments:
    index = _read_mmidx_index(prefix)
    # Sequences must lie back to back in order, as every MMIDIDX writer lays them out, because the
    # reader addresses documents as slices of one flat token array. merge_token_files copies any
    # layout sequence by sequence, so it can rewrite such a file.
    if not _pointers_are_sequential(index):
        raise DataError(
            f"{idx_path(prefix)!r} has sequence pointers that are not contiguous and in order; this reader supports "
            f"only files written sequentially. Rewrite it as a sequential file with "
            f"'python data_tools/merge_data.py --input {prefix} --output_prefix NEW_PREFIX' and train on NEW_PREFIX"
        )
    return _documents_from_index(prefix, index)


def _documents_from_index(prefix: str, index: _IndexArrays) -> TokenDocuments:
    data_file = bin_path(prefix)
    num_tokens = int(np.sum(index.sizes, dtype=np.int64))
    expected_bin_bytes = num_tokens * index.dtype.itemsize
    actual_bin_bytes = os.path.getsize(data_file)
    if actual_bin_bytes != expected_bin_bytes:
        raise DataError(
            f"{data_file!r} is {actual_bin_bytes} bytes but {idx_path(prefix)!r} describes {num_tokens} tokens of "
            f"{index.dtype} ({expected_bin_bytes} bytes); the pair does not belong together or one file is truncated"
        )
    dtype = index.dtype
    tokens = np.memmap(data_file, dtype=dtype, mode="r") if num_tokens else np.zeros(0, dtype=dtype)
    return TokenDocuments(prefix, tokens, index.sizes, index.document_index)


def _open_npy_pair(prefix: str) -> TokenDocuments:
    ids_file, index_file = prefix + "_ids.npy", prefix + "_idx.npz"
    for path in (ids_file, index_file):
        if not os.path.isfile(path):
            raise DataError(f"missing {path!r}: the older format needs both {ids_file} and {index_file}")
    try:
        tokens = np.load(ids_file, mmap_mode="r", allow_pickle=False)
        with np.load(index_file, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in ("lens", "docs") if name in archive.files}
            found = sorted(archive.files)
    except (ValueError, OSError) as error:
        raise DataError(f"cannot read {ids_file!r} / {index_file!r}: {error}") from None
    if len(arrays) != 2:
        raise DataError(f"{index_file!r} lacks the 'lens' or 'docs' array; it contains {found}")
    sizes = arrays["lens"].astype(np.int32, copy=False)
    document_index = arrays["docs"].astype(np.int64, copy=False)
    if tokens.ndim != 1 or tokens.dtype not in CODE_BY_DTYPE:
        raise DataError(f"{ids_file!r} contains a {tokens.ndim}-d {tokens.dtype} array; expected 1-d integer token ids")
    _check_document_index(index_file, document_index, len(sizes))
    num_tokens = int(np.sum(sizes, dtype=np.int64))
    if num_tokens != len(tokens):
        raise DataError(
            f"{index_file!r} describes {num_tokens} tokens but {ids_file!r} contains {len(tokens)}; "
            f"the pair does not belong together"
        )
    return TokenDocuments(prefix, tokens, sizes, document_index)


def _check_document_index(path: str, document_index: np.ndarray, num_sequences: int) -> None:
    if len(document_index) == 0 or document_index[0] != 0 or document_index[-1] != num_sequences:
        raise DataError(
            f"{path!r} has an invalid document index: it must start at 0 and end at the sequence count "
            f"{num_sequences}; rebuild the file"
        )
    if np.any(np.diff(document_index) < 0):
        raise DataError(f"{path!r} has a decreasing document index; rebuild the file")


def find_prefixes(directory: str) -> list[str]:
    """Return every token-file prefix in ``directory`` (``*.idx`` or ``*_idx.npz``), sorted."""
    prefixes = set()
    for name in os.listdir(directory):
        if name.endswith(".idx"):
            prefixes.add(os.path.join(directory, name[: -len(".idx")]))
        elif name.endswith("_idx.npz"):
            prefixes.add(os.path.join(directory, name[: -len("_idx.npz")]))
    return sorted(prefixes)


def read_token_metadata(prefix: str) -> Optional[dict]:
    """Return the contents of ``PREFIX.meta.json``, or None when the pair has no metadata file."""
    path = metadata_path(prefix)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            record = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"cannot read metadata file {path!r}: {error}; delete it (the token files do not need "
                        f"it) or regenerate the token files") from None
    if not isinstance(record, dict):
        raise DataError(f"metadata file {path!r} does not contain a JSON object; delete it or regenerate the token files")
    tokenizer = record.get("tokenizer", {})
    if not isinstance(tokenizer, dict):
        raise DataError(f"metadata file {path!r}: \"tokenizer\" is {tokenizer!r}, not an object with the tokenizer's "
                        "name, sha256 and vocab_size; delete the file (the token files do not need it) or regenerate "
                        "the token files")
    return record


class _MergeSource(NamedTuple):
    """One input of a merge: its sequences and a way to read their token bytes in index order."""

    path: str
    dtype: np.dtype
    sizes: np.ndarray
    document_index: np.ndarray
    token_chunks: Callable[[int], Iterator[bytes]]  # chunk_bytes -> the token bytes, in pieces

    @property
    def num_documents(self) -> int:
        return len(self.document_index) - 1

    @property
    def num_tokens(self) -> int:
        return int(np.sum(self.sizes, dtype=np.int64))


def _open_merge_source(prefix: str) -> _MergeSource:
    if os.path.isfile(idx_path(prefix)) or os.path.isfile(bin_path(prefix)):
        index = _read_mmidx_index(prefix)
        if not _pointers_are_sequential(index):
            chunks = _scattered_token_chunks(prefix, index)
            return _MergeSource(prefix, index.dtype, index.sizes, index.document_index, chunks)
        documents = _documents_from_index(prefix, index)
    else:
        documents = open_token_documents(prefix)

    def flat_chunks(chunk_bytes: int) -> Iterator[bytes]:
        flat = documents.tokens.view(np.uint8) if documents.num_tokens else np.zeros(0, np.uint8)
        for start in range(0, len(flat), chunk_bytes):
            yield flat[start : start + chunk_bytes].tobytes()

    return _MergeSource(prefix, documents.dtype, documents.sizes, documents.document_index, flat_chunks)


def _scattered_token_chunks(prefix: str, index: _IndexArrays) -> Callable[[int], Iterator[bytes]]:
    """Check the pointers of a file whose sequences are not back to back, and return a reader of them in index order."""
    data_file = bin_path(prefix)
    itemsize = index.dtype.itemsize
    starts = index.pointers
    ends = starts + index.sizes.astype(np.int64) * itemsize
    data_bytes = os.path.getsize(data_file)
    invalid = (index.sizes < 0) | (starts < 0) | (starts % itemsize != 0) | (ends > data_bytes)
    if np.any(invalid):
        i = int(np.argmax(invalid))
        raise DataError(
            f"{idx_path(prefix)!r}: sequence {i} ({index.sizes[i]} tokens at byte {starts[i]}) lies outside "
            f"{data_file!r} ({data_bytes} bytes) or is not aligned to its {itemsize}-byte ids; the pair does not "
            f"belong together or one file is truncated"
        )
    # Runs of sequences that do follow each other are copied in one piece each.
    breaks = np.flatnonzero(starts[1:] != ends[:-1]) + 1
    run_firsts = np.concatenate([[0], breaks])
    run_lasts = np.concatenate([breaks, [len(starts)]]) - 1

    def scattered_chunks(chunk_bytes: int) -> Iterator[bytes]:
        data = np.memmap(data_file, dtype=np.uint8, mode="r") if data_bytes else np.zeros(0, np.uint8)
        for first, last in zip(run_firsts.tolist(), run_lasts.tolist()):
            run_end = int(ends[last])
            for offset in range(int(starts[first]), run_end, chunk_bytes):
                yield data[offset : min(offset + chunk_bytes, run_end)].tobytes()

    return scattered_chunks


def _check_distinct_inputs(prefixes: list[str]) -> None:
    # Two spellings of one prefix (data/a, ./data/a, a symbolic link) name the same index file.
    first_spelling: dict[str, str] = {}
    for prefix in prefixes:
        index_file = idx_path(prefix)
        if not os.path.exists(index_file) and os.path.exists(prefix + "_idx.npz"):
            index_file = prefix + "_idx.npz"
        key = os.path.realpath(index_file)
        if key in first_spelling:
            raise DataError(
                f"input {prefix!r} is given twice (as {first_spelling[key]!r} and {prefix!r}, both {key}); "
                f"list each token file once"
            )
        first_spelling[key] = prefix


def _describe_tokenizer(tokenizer: dict) -> str:
    sha256 = str(tokenizer.get("sha256", ""))[:12]
    return (f"{tokenizer.get('name')!r} ({tokenizer.get('kind')}, vocab_size {tokenizer.get('vocab_size')}, "
            f"sha256 {sha256}...)")


def _merged_metadata(sources: list[_MergeSource], tool: str) -> Optional[dict]:
    """Check that the inputs share one tokenizer and return the output's metadata.

    Returns None, after one warning, when some input has no usable ``PREFIX.meta.json`` (PaddleNLP
    writes none), because then the tokenizers cannot be compared. Raises DataError when two
    inputs' tokenizers differ in file hash or vocabulary size.
    """
    records = {}
    unchecked = []
    for source in sources:
        record = read_token_metadata(source.path)
        if record is None:
            unchecked.append(source.path)
        elif record.get("documents") != source.num_documents or record.get("tokens") != source.num_tokens:
            # A pair replaced by a tool that writes no metadata, or a copy of another pair's file.
            logger.warning("ignoring %s: it describes %s documents and %s tokens, but the token files contain %d "
                           "and %d", metadata_path(source.path), record.get("documents"), record.get("tokens"),
                           source.num_documents, source.num_tokens)
            unchecked.append(source.path)
        else:
            records[source.path] = record
    if unchecked:
        logger.warning("cannot check that the inputs were made by one tokenizer: no metadata file (PREFIX.meta.json) "
                       "for %s; merging anyway", ", ".join(unchecked))
        return None

    first = sources[0].path
    first_tokenizer = records[first].get("tokenizer", {})
    for source in sources[1:]:
        tokenizer = records[source.path].get("tokenizer", {})
        same_file = tokenizer.get("sha256") == first_tokenizer.get("sha256")
        if not same_file or tokenizer.get("vocab_size") != first_tokenizer.get("vocab_size"):
            raise DataError(
                f"cannot merge token files made by different tokenizers: {first} used "
                f"{_describe_tokenizer(first_tokenizer)} and {source.path} used {_describe_tokenizer(tokenizer)}; "
                f"tokenize every input with one tokenizer (data_tools/create_pretraining_data.py)"
            )

    def common_value(key: str):
        # A setting that differs between the inputs is recorded as null.
        values = [records[source.path].get(key) for source in sources]
        return values[0] if all(value == values[0] for value in values) else None

    return {
        "tool": tool,
        "tokenizer": first_tokenizer,
        "append_eos": common_value("append_eos"),
        "json_keys": common_value("json_keys"),
        "inputs": [source.path for source in sources],
    }


def merge_token_files(prefixes: list[str], output_prefix: str, chunk_bytes: int = 64 << 20,
                      tool: str = "fleetlm.data.indexed_dataset.merge_token_files") -> IndexedDatasetWriter:
    """Concatenate several token files into one ``.bin/.idx`` pair and return the finished writer.

    Every input must have the same token dtype, because the ids are copied as raw bytes, and may
    be named once. When every input has a ``PREFIX.meta.json``, their tokenizers must match and
    the output gets one too, with ``tool`` as its tool name. Inputs whose sequences are not back to
    back are copied sequence by sequence, so the output is always sequential.
    """
    if not prefixes:
        raise DataError("nothing to merge: no input prefixes were given")
    _check_distinct_inputs(prefixes)
    sources = [_open_merge_source(prefix) for prefix in prefixes]
    dtypes = {str(source.dtype) for source in sources}
    if len(dtypes) > 1:
        listing = ", ".join(f"{source.path} ({source.dtype})" for source in sources)
        raise DataError(
            f"cannot merge token files of different dtypes: {listing}; every input must come from the same "
            f"tokenizer (or one of the same vocabulary size class)"
        )
    metadata = _merged_metadata(sources, tool)
    writer = IndexedDatasetWriter(output_prefix, sources[0].dtype, metadata=metadata)
    with writer:
        for source in sources:
            writer.add_sequences(source.sizes, source.document_index, source.token_chunks(chunk_bytes))
        writer.finalize()
    return writer
