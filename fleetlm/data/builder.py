"""Build the train, valid and test datasets of a pretraining run from token files."""

import math
import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from fleetlm.data.blended_dataset import BLEND_ARRAYS, BlendedDataset, build_blend_index
from fleetlm.data.errors import DataError
from fleetlm.data.gpt_dataset import GPTDataset
from fleetlm.data.index_cache import IndexCache
from fleetlm.data.indexed_dataset import TokenDocuments, dataset_exists, find_prefixes, open_token_documents
from fleetlm.utils.log import get_logger

logger = get_logger(__name__)

SPLIT_NAMES = ("train", "valid", "test")


@dataclass
class Source:
    """One weighted token file of a blend."""

    weight: float
    prefix: str


def parse_split(split: str) -> list[float]:
    """Parse "949,50,1"-style weights into three non-negative fractions summing to 1.

    Missing trailing fields are 0, so "98,2" has no test split.
    """
    fields = [field.strip() for field in str(split).split(",")]
    if len(fields) > len(SPLIT_NAMES):
        raise DataError(
            f"split {split!r} has {len(fields)} fields; give at most three weights, train,valid,test (e.g. \"949,50,1\")"
        )
    weights = []
    for field in fields:
        try:
            weight = float(field)
        except ValueError:
            raise DataError(f"split {split!r} has the non-numeric field {field!r}; use numbers such as \"949,50,1\"") from None
        if not math.isfinite(weight) or weight < 0:
            raise DataError(f"split {split!r} has the invalid field {field!r}; every weight must be a finite number >= 0")
        weights.append(weight)
    total = sum(weights)
    if not math.isfinite(total):
        raise DataError(f"split {split!r} sums to more than the largest float; use small weights such as \"949,50,1\"")
    if total == 0:
        raise DataError(f"split {split!r} gives every split weight 0; give the train split a positive weight")
    weights += [0.0] * (len(SPLIT_NAMES) - len(weights))
    return [weight / total for weight in weights]


def split_document_ranges(fractions: Sequence[float], num_documents: int) -> list[tuple[int, int]]:
    """Divide ``num_documents`` documents into consecutive ranges by the split fractions."""
    # Boundaries round the cumulative fractions half up (not numpy's half-to-even), and the last is exact.
    cumulative = np.cumsum(fractions)
    boundaries = [0] + [int(math.floor(c * num_documents + 0.5)) for c in cumulative[:-1]] + [num_documents]
    boundaries = np.maximum.accumulate(np.minimum(boundaries, num_documents)).tolist()
    return [(boundaries[i], boundaries[i + 1]) for i in range(len(fractions))]


def parse_input_dir(input_dir: str) -> list[Source]:
    """Parse "w1 prefix1 w2 prefix2 ...", a directory of token files (weight 1 each) or a single prefix."""
    fields = str(input_dir).split()
    if not fields:
        raise DataError("input_dir is empty; pass a token-file prefix, a directory of them, or \"w1 prefix1 w2 prefix2\"")
    if len(fields) > 1:
        if len(fields) % 2:
            raise DataError(
                f"input_dir {input_dir!r} has {len(fields)} fields; a blend needs weight and prefix pairs "
                f"such as \"0.7 data/web 0.3 data/books\""
            )
        sources = []
        for weight_text, prefix in zip(fields[0::2], fields[1::2]):
            try:
                weight = float(weight_text)
            except ValueError:
                raise DataError(
                    f"input_dir {input_dir!r} has the weight {weight_text!r} (for {prefix!r}), which is not a number; "
                    f"write weight and prefix pairs"
                ) from None
            if not math.isfinite(weight) or weight < 0:
                raise DataError(f"input_dir {input_dir!r} gives {prefix!r} the invalid weight {weight_text!r}; use >= 0")
            for earlier in sources:
                if os.path.abspath(earlier.prefix) == os.path.abspath(prefix):
                    raise DataError(
                        f"input_dir {input_dir!r} names {prefix!r} twice (weights {earlier.weight:g} and {weight_text}); "
                        f"give it once with the summed weight {earlier.weight + weight:g}"
                    )
            sources.append(Source(weight, prefix))
        if not math.isfinite(sum(source.weight for source in sources)):
            raise DataError(f"input_dir {input_dir!r} has weights that sum to more than the largest float; use small weights")
        if sum(source.weight for source in sources) == 0:
            raise DataError(f"input_dir {input_dir!r} gives every source weight 0; give at least one a positive weight")
        return [source for source in sources if source.weight > 0]
    path = fields[0]
    if os.path.isdir(path):
        prefixes = find_prefixes(path)
        if not prefixes:
            raise DataError(f"no token files (*.idx or *_idx.npz) in directory {path!r}; run data_tools/create_pretraining_data.py")
        return [Source(1.0, prefix) for prefix in prefixes]
    if not dataset_exists(path):
        raise DataError(
            f"input_dir {path!r} is neither a directory nor the prefix of a token file "
            f"({path}.bin/.idx or {path}_ids.npy/_idx.npz)"
        )
    return [Source(1.0, path)]


def _default_cache_dir(prefix: str, data_cache: Optional[str]) -> str:
    return data_cache if data_cache else os.path.join(os.path.dirname(os.path.abspath(prefix)), "index-cache")


def _validate_arguments(max_seq_length: int, num_samples: Sequence[int]) -> None:
    if not isinstance(max_seq_length, (int, np.integer)) or max_seq_length < 1:
        raise DataError(f"max_seq_length must be a positive integer, got {max_seq_length!r}")
    if len(num_samples) != 3 or any(not isinstance(n, (int, np.integer)) or n < 0 for n in num_samples):
        raise DataError(f"num_samples must be three integers >= 0 (train, valid, test), got {num_samples!r}")


def _warn_if_missing(cache: IndexCache, allow_build: bool) -> None:
    # Ranks other than 0 build an index only when they cannot see rank 0's cache, e.g. on another
    # node without a shared file system; the result is identical, only the work is repeated.
    if not allow_build and not cache.exists():
        logger.warning("index cache %s is missing after rank 0 built it; building it on this rank too. "
                       "Set data_cache to a directory that every node shares to avoid this.", cache.description_path)


# The run_pretrain.py switch that stops a run from reading each split.
_SPLIT_SWITCH = ("--do_train false", "--do_eval false", "--do_predict false")


def _build_split(split_id: int, sources: list[Source], documents: list[TokenDocuments], fractions: list[float],
                 max_seq_length: int, seed: int, num_samples: int, data_cache: Optional[str], allow_build: bool):
    split_name = SPLIT_NAMES[split_id]
    for source, docs in zip(sources, documents):
        first, last = split_document_ranges(fractions, docs.num_documents)[split_id]
        if first == last:
            raise DataError(
                f"the {split_name} split of {source.prefix!r} is empty ({docs.num_documents} documents, split "
                f"fractions {[round(f, 4) for f in fractions]}) but {num_samples} {split_name} samples are needed; "
                f"give the {split_name} split a larger weight (--split) or turn off what reads it "
                f"({_SPLIT_SWITCH[split_id]})"
            )

    weights = [source.weight for source in sources]
    first_cache_dir = _default_cache_dir(sources[0].prefix, data_cache)
    blend = None
    if len(sources) > 1:
        blend_cache = IndexCache(first_cache_dir, name=f"blend-{split_name}", description={
            "sources": [os.path.basename(source.prefix) for source in sources],
            "weights": weights,
            "num_samples": num_samples,
        })
        _warn_if_missing(blend_cache, allow_build)
        blend = blend_cache.get_or_build(BLEND_ARRAYS, lambda: build_blend_index(weights, num_samples))
        counts = np.bincount(blend["source_index"], minlength=len(sources)).tolist()
    else:
        counts = [num_samples]

    datasets = []
    for source, docs, count in zip(sources, documents, counts):
        if count == 0:
            datasets.append(None)
            continue
        dataset = GPTDataset(docs, split_name, split_id, split_document_ranges(fractions, docs.num_documents)[split_id],
                             max_seq_length, count, seed, _default_cache_dir(source.prefix, data_cache))
        _warn_if_missing(dataset.cache, allow_build)
        dataset.build_or_load()
        datasets.append(dataset)
        logger.info("%s: %s weight %.4f, documents %d..%d, %d samples over %d epochs (%d tokens an epoch)",
                    split_name, source.prefix, source.weight / sum(weights), dataset.documents[0],
                    dataset.documents[-1], count, dataset.num_epochs, dataset.tokens_per_epoch)

    if len(sources) == 1:
        return datasets[0]
    return BlendedDataset(datasets, weights, num_samples, blend_cache, blend)


def build_pretraining_datasets(
    input_dir: str,
    split: str,
    max_seq_length: int,
    seed: int,
    num_samples: tuple[int, int, int],
    data_cache: Optional[str] = None,
    rank: int = 0,
    barrier: Optional[Callable[[], None]] = None,
):
    """Return the (train, valid, test) datasets; a split with 0 requested samples is returned as None.

    Each dataset has ``len(ds)`` equal to its requested sample count and ``ds[i]`` returns an int64
    array of ``max_seq_length + 1`` tokens. Rank 0 builds the index caches, and the other ranks wait
    at ``barrier`` and then read them. ``barrier`` is called exactly once on every rank, so every
    rank must call this function.

    Raises DataError for invalid arguments, unreadable token files, an empty split that is needed,
    or a source whose split has fewer tokens than one sample.
    """
    _validate_arguments(max_seq_length, num_samples)
    fractions = parse_split(split)
    sources = parse_input_dir(input_dir)
    documents = [open_token_documents(source.prefix) for source in sources]
    dtypes = {str(docs.dtype) for docs in documents}
    if len(dtypes) > 1:
        listing = ", ".join(f"{source.prefix} ({docs.dtype})" for source, docs in zip(sources, documents))
        logger.warning("blending token files of different dtypes (%s); check that one tokenizer made them all", listing)

    def build_all(allow_build: bool):
        return tuple(
            _build_split(split_id, sources, documents, fractions, max_seq_length, seed, count, data_cache, allow_build)
            if count > 0 else None
            for split_id, count in enumerate(num_samples)
        )

    # Rank 0 builds and caches every index, then releases the others, which find them in the cache.
    # The barrier runs even when rank 0 fails, so the other ranks reach the same error instead of hanging.
    if rank == 0:
        try:
            return build_all(allow_build=True)
        finally:
            if barrier is not None:
                barrier()
    if barrier is not None:
        barrier()
    return build_all(allow_build=False)
