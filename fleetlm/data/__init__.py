"""Data pipeline: token files, GPT-style sample indices, blending and the pretraining datasets."""

from fleetlm.data.builder import build_pretraining_datasets
from fleetlm.data.errors import DataError

__all__ = ["DataError", "build_pretraining_datasets"]
