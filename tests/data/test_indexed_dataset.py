"""The .bin/.idx format: layout checked by an independent parser, rejections, the older npy pair, merging."""

import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT
from fleetlm.data import DataError
from fleetlm.data.indexed_dataset import IndexedDatasetWriter, merge_token_files, open_token_documents

DOCUMENTS = [[5, 6, 7], [1], [65535, 0, 2, 3], [9, 9]]


def parse_idx_by_hand(path: str) -> dict:
    """Parse an MMIDIDX version-1 index with struct alone, following the Megatron-LM layout."""
    with open(path, "rb") as handle:
        data = handle.read()
    magic = data[:9]
    version, code = struct.unpack("<QB", data[9:18])
    num_sequences, num_document_entries = struct.unpack("<QQ", data[18:34])
    position = 34
    sizes = struct.unpack(f"<{num_sequences}i", data[position : position + 4 * num_sequences])
    position += 4 * num_sequences
    pointers = struct.unpack(f"<{num_sequences}q", data[position : position + 8 * num_sequences])
    position += 8 * num_sequences
    document_index = struct.unpack(f"<{num_document_entries}q", data[position : position + 8 * num_document_entries])
    position += 8 * num_document_entries
    return {"magic": magic, "version": version, "code": code, "sizes": list(sizes), "pointers": list(pointers),
            "document_index": list(document_index), "trailing_bytes": len(data) - position}


def write_documents(prefix: str, documents, dtype=np.uint16) -> None:
    with IndexedDatasetWriter(prefix, dtype) as writer:
        for document in documents:
            writer.add_document(np.array(document))
        writer.finalize()


def test_layout_matches_megatron(tmp_path):
    prefix = str(tmp_path / "d")
    write_documents(prefix, DOCUMENTS)
    parsed = parse_idx_by_hand(prefix + ".idx")

    assert parsed["magic"] == b"MMIDIDX\x00\x00"
    assert parsed["version"] == 1
    assert parsed["code"] == 8  # uint16
    assert parsed["sizes"] == [3, 1, 4, 2]
    assert parsed["pointers"] == [0, 6, 8, 16]
    assert parsed["document_index"] == [0, 1, 2, 3, 4]
    assert parsed["trailing_bytes"] == 0
    with open(prefix + ".bin", "rb") as handle:
        assert struct.unpack("<10H", handle.read()) == tuple(t for d in DOCUMENTS for t in d)


def test_int32_layout_and_read_back(tmp_path):
    prefix = str(tmp_path / "d")
    documents = [[151850, 0], [70000, 1, 2]]
    write_documents(prefix, documents, dtype=np.int32)
    parsed = parse_idx_by_hand(prefix + ".idx")
    reader = open_token_documents(prefix)

    assert parsed["code"] == 4
    assert parsed["pointers"] == [0, 8]
    assert reader.dtype == np.int32
    assert reader.document(0).tolist() == documents[0]
    assert reader.document(1).tolist() == documents[1]


def test_multi_sequence_documents_read(tmp_path):
    # A file whose documents span several sequences, as PaddleNLP writes with --split_sentences.
    prefix = str(tmp_path / "d")
    sizes = np.array([2, 3, 1], dtype=np.int32)
    pointers = np.array([0, 4, 10], dtype=np.int64)
    document_index = np.array([0, 2, 3], dtype=np.int64)
    with open(prefix + ".idx", "wb") as handle:
        handle.write(b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 8, 3, 3))
        handle.write(sizes.tobytes() + pointers.tobytes() + document_index.tobytes())
    np.arange(6, dtype=np.uint16).tofile(prefix + ".bin")
    reader = open_token_documents(prefix)

    assert reader.num_documents == 2
    assert reader.document(0).tolist() == [0, 1, 2, 3, 4]
    assert reader.document(1).tolist() == [5]


def corrupt(prefix: str, offset: int, data: bytes) -> None:
    with open(prefix + ".idx", "r+b") as handle:
        handle.seek(offset)
        handle.write(data)


@pytest.mark.parametrize(
    "offset, data, expected",
    [
        (0, b"XXIDIDX", "is not an MMIDIDX index file"),
        (9, struct.pack("<Q", 2), "has index version 2"),
        (17, struct.pack("<B", 6), "has dtype code 6, which is not an integer token dtype"),
        (18, struct.pack("<Q", 5), "is 122 bytes but its header (5 sequences"),
    ],
)
def test_bad_header_rejected_naming_file(tmp_path, offset, data, expected):
    prefix = str(tmp_path / "d")
    write_documents(prefix, DOCUMENTS)
    corrupt(prefix, offset, data)
    with pytest.raises(DataError) as error:
        open_token_documents(prefix)
    assert expected in str(error.value)
    assert prefix + ".idx" in str(error.value)


def test_bin_size_mismatch_rejected(tmp_path):
    prefix = str(tmp_path / "d")
    write_documents(prefix, DOCUMENTS)
    with open(prefix + ".bin", "ab") as handle:
        handle.write(b"\x00\x00")
    with pytest.raises(DataError) as error:
        open_token_documents(prefix)
    assert f"{prefix}.bin' is 22 bytes" in str(error.value)
    assert "10 tokens of uint16 (20 bytes)" in str(error.value)


def test_missing_bin_rejected(tmp_path):
    prefix = str(tmp_path / "d")
    write_documents(prefix, DOCUMENTS)
    os.remove(prefix + ".bin")
    with pytest.raises(DataError, match=r"missing .*d\.bin"):
        open_token_documents(prefix)


def test_no_files_for_prefix(tmp_path):
    with pytest.raises(DataError, match="no token files for prefix"):
        open_token_documents(str(tmp_path / "absent"))


def test_writer_abort_leaves_nothing(tmp_path):
    prefix = str(tmp_path / "d")
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(prefix, np.uint16) as writer:
            writer.add_document(np.array([1, 2]))
            raise RuntimeError("stop")
    assert os.listdir(tmp_path) == []


def test_older_npy_pair_read(tmp_path):
    prefix = str(tmp_path / "old")
    tokens = np.array([1, 2, 3, 4, 5, 6, 7], dtype=np.uint16)
    np.save(prefix + "_ids.npy", tokens)
    # Three sentences, and the first document contains two of them.
    np.savez(prefix + "_idx.npz", lens=np.array([2, 3, 2], dtype=np.int32), docs=np.array([0, 2, 3], dtype=np.int64))
    reader = open_token_documents(prefix)

    assert reader.num_documents == 2
    assert reader.document(0).tolist() == [1, 2, 3, 4, 5]
    assert reader.document(1).tolist() == [6, 7]


def test_older_npy_pair_mismatch_rejected(tmp_path):
    prefix = str(tmp_path / "old")
    np.save(prefix + "_ids.npy", np.arange(5, dtype=np.uint16))
    np.savez(prefix + "_idx.npz", lens=np.array([2, 4], dtype=np.int32), docs=np.array([0, 2], dtype=np.int64))
    with pytest.raises(DataError, match=r"describes 6 tokens but .*old_ids\.npy' contains 5"):
        open_token_documents(prefix)


def test_merge_concatenates_documents(tmp_path):
    write_documents(str(tmp_path / "a"), DOCUMENTS[:2])
    write_documents(str(tmp_path / "b"), DOCUMENTS[2:])
    merge_token_files([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "all"))
    write_documents(str(tmp_path / "direct"), DOCUMENTS)

    assert open(tmp_path / "all.bin", "rb").read() == open(tmp_path / "direct.bin", "rb").read()
    assert open(tmp_path / "all.idx", "rb").read() == open(tmp_path / "direct.idx", "rb").read()


def test_merge_rejects_mixed_dtypes(tmp_path):
    write_documents(str(tmp_path / "small"), DOCUMENTS, dtype=np.uint16)
    write_documents(str(tmp_path / "large"), DOCUMENTS, dtype=np.int32)
    with pytest.raises(DataError) as error:
        merge_token_files([str(tmp_path / "small"), str(tmp_path / "large")], str(tmp_path / "all"))
    assert "different dtypes" in str(error.value)
    assert "small (uint16)" in str(error.value)
    assert "large (int32)" in str(error.value)
    assert not os.path.exists(tmp_path / "all.bin")


def test_merge_tool_directory(tmp_path):
    (tmp_path / "parts").mkdir()
    write_documents(str(tmp_path / "parts" / "p0"), DOCUMENTS[:1])
    write_documents(str(tmp_path / "parts" / "p1"), DOCUMENTS[1:])
    result = subprocess.run([sys.executable, "data_tools/merge_data.py", "--input", str(tmp_path / "parts"),
                             "--output-prefix", str(tmp_path / "merged")],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "documents 4, tokens 10, dtype uint16" in result.stdout
    assert open_token_documents(str(tmp_path / "merged")).document(2).tolist() == DOCUMENTS[2]


def test_inspect_tool_decodes_document(shakespeare_gpt2):
    from conftest import TOKENIZERS

    result = subprocess.run([sys.executable, "data_tools/inspect_data.py", "--input_prefix", shakespeare_gpt2,
                             "--tokenizer_name_or_path", TOKENIZERS["gpt2"], "--document", "1"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "dtype:      uint16" in result.stdout
    assert "documents:  10" in result.stdout
    # Sorted by file name, document 1 is julius_caesar_gut.txt (after hamlet_gut.txt).
    assert "JULIUS CAESAR" in result.stdout.upper()


def dead_pid() -> int:
    """Return the id of a process that has ended: a short child, started and waited for."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_writer_removes_stale_temporary_files(tmp_path, caplog):
    import logging

    stale_pid, live_pid = dead_pid(), os.getpid()
    stale = [f".d.bin.{stale_pid}.0123abcd.tmp", f".d.idx.{stale_pid}.0123abcd.tmp",
             f".d.meta.json.{stale_pid}.0123abcd.tmp"]
    kept = [f".d.bin.{live_pid}.89abcdef.tmp", f".other.bin.{stale_pid}.0123abcd.tmp", f".d.b.bin.{stale_pid}.0123abcd.tmp"]
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"x")
    logger = logging.getLogger("fleetlm")
    logger.addHandler(caplog.handler)
    try:
        write_documents(str(tmp_path / "d"), DOCUMENTS)
    finally:
        logger.removeHandler(caplog.handler)

    assert sorted(os.listdir(tmp_path)) == sorted(kept + ["d.bin", "d.idx"])
    removed_lines = [record.getMessage() for record in caplog.records if "removed stale temporary file" in record.getMessage()]
    assert len(removed_lines) == 3
    for name in stale:
        assert sum(name in line for line in removed_lines) == 1
    assert all(f"process {stale_pid}" in line for line in removed_lines)


def write_reversed_pair(prefix: str, documents) -> None:
    """Write a valid pair whose sequences are stored in reverse order in the .bin."""
    sizes = np.array([len(document) for document in documents], dtype=np.int32)
    byte_offsets = {}
    position = 0
    for i in reversed(range(len(documents))):
        byte_offsets[i] = position
        position += 2 * len(documents[i])
    pointers = np.array([byte_offsets[i] for i in range(len(documents))], dtype=np.int64)
    document_index = np.arange(len(documents) + 1, dtype=np.int64)
    with open(prefix + ".idx", "wb") as handle:
        handle.write(b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 8, len(documents), len(documents) + 1))
        handle.write(sizes.tobytes() + pointers.tobytes() + document_index.tobytes())
    np.array([t for d in reversed(documents) for t in d], dtype=np.uint16).tofile(prefix + ".bin")


def test_scattered_pointers_fix_that_works(tmp_path):
    prefix = str(tmp_path / "scattered")
    write_reversed_pair(prefix, DOCUMENTS)
    with pytest.raises(DataError) as error:
        open_token_documents(prefix)
    message = str(error.value)
    assert "not contiguous" in message
    assert f"python data_tools/merge_data.py --input {prefix} --output_prefix NEW_PREFIX" in message

    # Run the command the message recommends.
    fixed = str(tmp_path / "fixed")
    command = message.split("'")[-2].replace("NEW_PREFIX", fixed).split()
    assert command[:2] == ["python", "data_tools/merge_data.py"]
    result = subprocess.run([sys.executable, *command[1:]], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr

    reader = open_token_documents(fixed)
    assert [reader.document(i).tolist() for i in range(reader.num_documents)] == DOCUMENTS
    write_documents(str(tmp_path / "direct"), DOCUMENTS)
    assert open(fixed + ".bin", "rb").read() == open(tmp_path / "direct.bin", "rb").read()
    assert open(fixed + ".idx", "rb").read() == open(tmp_path / "direct.idx", "rb").read()


def test_scattered_pointer_outside_bin_rejected(tmp_path):
    prefix = str(tmp_path / "scattered")
    write_reversed_pair(prefix, DOCUMENTS)
    with open(prefix + ".bin", "r+b") as handle:
        handle.truncate(10)
    with pytest.raises(DataError, match=r"sequence 0 \(3 tokens at byte 14\) lies outside"):
        merge_token_files([prefix], str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out.bin")


def test_writer_refuses_directory_target_and_keeps_older_pair(tmp_path):
    prefix = str(tmp_path / "docs")
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        writer.add_document(np.arange(5))
        writer.finalize()
    older = {name: (tmp_path / name).read_bytes() for name in ("docs.bin", "docs.idx")}
    (tmp_path / "docs.meta.json").mkdir()
    with pytest.raises(DataError, match=r"docs\.meta\.json is a directory"):
        with IndexedDatasetWriter(prefix, np.uint16, metadata={"tool": "test"}) as writer:
            writer.add_document(np.arange(9))
            writer.finalize()
    assert sorted(os.listdir(tmp_path)) == ["docs.bin", "docs.idx", "docs.meta.json"]
    assert {name: (tmp_path / name).read_bytes() for name in older} == older
