"""Fixtures shared by the trainer, model and end-to-end tests."""

import os
import sys

import pytest

from fleetlm.data.synthetic import write_pattern_tokens

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)
sys.path.insert(0, TESTS_DIR)


@pytest.fixture(scope="session")
def pattern_tokens(tmp_path_factory) -> str:
    """Prefix of a small synthetic token file with vocabulary 512 (the tiny model's)."""
    return write_pattern_tokens(str(tmp_path_factory.mktemp("tokens") / "pattern"))
