"""Fixtures shared by the trainer, model and end-to-end tests."""

import os
import sys

import numpy as np
import pytest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)
sys.path.insert(0, TESTS_DIR)


def write_pattern_tokens(prefix: str, num_documents: int = 300, vocab: int = 512, seed: int = 0) -> str:
    """Write a .bin/.idx pair of arithmetic token sequences (learnable, so loss curves move)."""
    from fleetlm.data.indexed_dataset import IndexedDatasetWriter

    rng = np.random.default_rng(seed)
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        for _ in range(num_documents):
            length = int(rng.integers(20, 300))
            start, stride = int(rng.integers(0, vocab)), int(rng.integers(1, 5))
            writer.add_document((start + stride * np.arange(length)) % vocab)
        writer.finalize()
    return prefix


@pytest.fixture(scope="session")
def pattern_tokens(tmp_path_factory) -> str:
    """Prefix of a small synthetic token file with vocabulary 512 (the tiny model's)."""
    return write_pattern_tokens(str(tmp_path_factory.mktemp("tokens") / "pattern"))
