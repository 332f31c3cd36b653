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
