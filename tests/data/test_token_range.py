"""The largest-token-id check that runs before training."""

import json
import os

import numpy as np
import pytest

from fleetlm.data import DataError
from fleetlm.data.indexed_dataset import IndexedDatasetWriter
from fleetlm.data.token_range import check_token_ids, max_token_id


def write_tokens(prefix, documents):
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        for document in documents:
            writer.add_document(np.array(document))
        writer.finalize()
    return prefix


def test_max_token_id_scans_and_caches(tmp_path):
    prefix = write_tokens(str(tmp_path / "a"), [[1, 2, 3], [700, 5], [9]])
    assert max_token_id(prefix) == 700
    cache = tmp_path / "index-cache" / "a-max-token-id.json"
    assert json.loads(cache.read_text())["max_token_id"] == 700


def test_rewritten_file_invalidates_cache(tmp_path):
    prefix = str(tmp_path / "a")
    write_tokens(prefix, [[1, 2, 3]])
    assert max_token_id(prefix) == 3
    os.remove(prefix + ".bin")
    os.remove(prefix + ".idx")
    write_tokens(prefix, [[1, 2, 3, 40000]])
    assert max_token_id(prefix) == 40000


def test_id_beyond_vocab_rejected(tmp_path):
    small = write_tokens(str(tmp_path / "small"), [[1, 2, 3]])
    large = write_tokens(str(tmp_path / "large"), [[1, 600, 3]])
    check_token_ids(f"1 {small} 1 {large}", vocab_size=601)
    with pytest.raises(DataError, match=r"large contains token id 600, but the model's vocab_size is 512; set vocab_size to at least 601"):
        check_token_ids(f"1 {small} 1 {large}", vocab_size=512)


def test_negative_id_rejected(tmp_path):
    prefix = str(tmp_path / "neg")
    with IndexedDatasetWriter(prefix, np.int32) as writer:
        writer.add_document(np.array([5, -1, 7], dtype=np.int32))
        writer.finalize()
    with pytest.raises(DataError, match=r"neg contains token id -1; token ids must be 0 or more"):
        check_token_ids(prefix, vocab_size=512)
