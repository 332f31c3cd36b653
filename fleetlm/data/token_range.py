"""Check, before training, that every token id in the data fits the model's vocabulary.

An id at or above ``vocab_size``, or below 0, makes the embedding lookup fail at the first batch
that contains it, which may be hours into a run (or in the first evaluation), and on some devices
reads out of bounds instead. The smallest and largest id of a token file are found once with a
chunked scan of the memory map. They are cached in a small JSON file next to the index cache,
keyed by the files' sizes and modification times, so later runs skip the scan.
"""

import json
import os
from typing import Optional

import numpy as np
from tqdm import tqdm

from fleetlm.data.builder import _default_cache_dir, parse_input_dir
from fleetlm.data.errors import DataError
from fleetlm.data.indexed_dataset import open_token_documents
from fleetlm.utils.log import get_logger

logger = get_logger(__name__)

_CHUNK_TOKENS = 1 << 26  # 64M tokens a step keeps each temporary within a few hundred MB


def _file_signature(prefix: str) -> str:
    parts = []
    for suffix in (".bin", ".idx", "_ids.npy", "_idx.npz"):
        path = prefix + suffix
        if os.path.isfile(path):
            stat = os.stat(path)
            parts.append(f"{suffix}:{stat.st_size}:{stat.st_mtime_ns}")
    return "|".join(parts)


def token_id_range(prefix: str, data_cache: Optional[str] = None) -> tuple[int, int]:
    """Return the smallest and largest token id in the token file ``prefix`` ((0, -1) when it has no tokens)."""
    signature = _file_signature(prefix)
    cache_path = os.path.join(_default_cache_dir(prefix, data_cache), os.path.basename(prefix) + "-max-token-id.json")
    try:
        with open(cache_path, encoding="utf-8") as f:
            cached = json.load(f)
        if cached.get("signature") == signature:
            return int(cached["min_token_id"]), int(cached["max_token_id"])
    except (OSError, ValueError, KeyError):
        pass

    tokens = open_token_documents(prefix).tokens
    smallest, largest = 0, -1
    chunks = range(0, len(tokens), _CHUNK_TOKENS)
    for start in tqdm(chunks, desc=f"scanning {os.path.basename(prefix)} token ids", unit="chunk",
                      disable=len(chunks) < 4, leave=False):
        chunk = tokens[start : start + _CHUNK_TOKENS]
        smallest = min(smallest, int(np.min(chunk)))
        largest = max(largest, int(np.max(chunk)))

    try:
        os.makedirs(os.path.dirname(cache_path), exist_ok=True)
        tmp = f"{cache_path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"signature": signature, "min_token_id": smallest, "max_token_id": largest}, f)
        os.replace(tmp, cache_path)
    except OSError as e:
        logger.warning("could not cache the token id range of %s in %s: %s", prefix, cache_path, e)
    return smallest, largest


def max_token_id(prefix: str, data_cache: Optional[str] = None) -> int:
    """Return the largest token id in the token file ``prefix`` (-1 when it has no tokens)."""
    return token_id_range(prefix, data_cache)[1]


def check_token_ids(input_dir: str, vocab_size: int, data_cache: Optional[str] = None) -> None:
    """Raise DataError when a source of ``input_dir`` contains a negative id or an id >= vocab_size."""
    for source in parse_input_dir(input_dir):
        smallest, largest = token_id_range(source.prefix, data_cache)
        if smallest < 0:
            raise DataError(
                f"{source.prefix} contains token id {smallest}; token ids must be 0 or more. The file was not "
                f"written by a tokenizer: re-tokenize the data with data_tools/create_pretraining_data.py."
            )
        if largest >= vocab_size:
            raise DataError(
                f"{source.prefix} contains token id {largest}, but the model's vocab_size is {vocab_size}; "
                f"set vocab_size to at least {largest + 1}, or re-tokenize the data with the model's tokenizer."
            )
