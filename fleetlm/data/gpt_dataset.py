"""GPT-style samples over one token file: fixed-length windows over a shuffled stream of documents.

Three index arrays define the samples of one split of one source, for ``seq_length`` S:

* document index: the split's documents in a fresh random order for every epoch, concatenated.
  Concatenating their tokens gives one token stream.
* sample index, ``[num_samples + 1, 2]``: row i is ``(position in the document index, token offset)``
  of stream position ``i * S``. Sample i is the S + 1 tokens from row i through row i + 1
  inclusive. So consecutive samples share one token, the last label of one being the first
  input of the next, and a sample may cross document boundaries.
* shuffle index: a permutation within each epoch's block of samples, where epoch e's block holds
  the samples whose first token lies in epoch e.

Every random draw is seeded by ``(seed, split, epoch)`` alone, and the arrays are built for whole
epochs. So sample i depends only on the data, the split, the seed, S and i. Asking for more
samples appends epochs without changing earlier samples, and a resumed run that skips the first
``consumed_samples`` continues the same stream.
"""

import math
import os

import numpy as np

from fleetlm.data.errors import DataError
from fleetlm.data.index_cache import IndexCache, hash_array
from fleetlm.data.indexed_dataset import TokenDocuments

# Salts that keep the document shuffle and the sample shuffle of one epoch independent.
_DOCUMENT_SHUFFLE = 0
_SAMPLE_SHUFFLE = 1
INDEX_ARRAYS = ["document_index", "sample_index", "shuffle_index"]


def epochs_needed(tokens_per_epoch: int, seq_length: int, num_samples: int) -> int:
    """Return the fewest epochs whose token stream yields ``num_samples`` samples of ``seq_length + 1`` tokens."""
    # E epochs hold E * T tokens and so (E * T - 1) // S samples: the last sample needs S + 1 tokens.
    return max(1, math.ceil((num_samples * seq_length + 1) / tokens_per_epoch))


def samples_in_epochs(tokens_per_epoch: int, seq_length: int, num_epochs: int) -> int:
    """Return the number of samples whose first token lies within the first ``num_epochs`` epochs."""
    return -(-num_epochs * tokens_per_epoch // seq_length)


def _rng(seed: int, split_id: int, epoch: int, purpose: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, split_id, epoch, purpose])))


def build_document_index(documents: np.ndarray, num_epochs: int, seed: int, split_id: int) -> np.ndarray:
    """Return ``documents`` shuffled independently for each of ``num_epochs`` epochs, concatenated."""
    dtype = np.int32 if documents.size == 0 or documents.max() < 2**31 else np.int64
    epochs = [
        documents[_rng(seed, split_id, epoch, _DOCUMENT_SHUFFLE).permutation(len(documents))]
        for epoch in range(num_epochs)
    ]
    return np.concatenate(epochs).astype(dtype, copy=False)


def build_sample_index(document_lengths: np.ndarray, document_index: np.ndarray, seq_length: int,
                       num_samples: int) -> np.ndarray:
    """Return the ``[num_samples + 1, 2]`` (document index position, offset) of stream positions ``i * S``."""
    stream_start = np.zeros(len(document_index) + 1, dtype=np.int64)
    np.cumsum(document_lengths[document_index], dtype=np.int64, out=stream_start[1:])
    positions = np.arange(num_samples + 1, dtype=np.int64) * seq_length
    if positions[-1] >= stream_start[-1]:
        raise DataError(
            f"internal error: the document index contains {stream_start[-1]} tokens, too few for "
            f"{num_samples} samples of {seq_length + 1} tokens"
        )
    # side="right" skips empty documents: it picks the last document starting at or before the position.
    rows = np.searchsorted(stream_start, positions, side="right") - 1
    sample_index = np.empty((num_samples + 1, 2), dtype=np.int64)
    sample_index[:, 0] = rows
    sample_index[:, 1] = positions - stream_start[rows]
    return sample_index


def build_shuffle_index(tokens_per_epoch: int, seq_length: int, num_epochs: int, seed: int,
                        split_id: int) -> np.ndarray:
    """Return a permutation of the samples of ``num_epochs`` epochs that shuffles within each epoch's block."""
    total = samples_in_epochs(tokens_per_epoch, seq_length, num_epochs)
    dtype = np.int32 if total < 2**31 else np.int64
    shuffle_index = np.empty(total, dtype=dtype)
    for epoch in range(num_epochs):
        first = samples_in_epochs(tokens_per_epoch, seq_length, epoch)
        last = samples_in_epochs(tokens_per_epoch, seq_length, epoch + 1)
        permutation = _rng(seed, split_id, epoch, _SAMPLE_SHUFFLE).permutation(last - first)
        shuffle_index[first:last] = permutation + first
    return shuffle_index


def build_indices(document_lengths: np.ndarray, documents: np.ndarray, seq_length: int, num_epochs: int,
                  seed: int, split_id: int) -> dict[str, np.ndarray]:
    """Build the three index arrays for ``num_epochs`` epochs of the given documents.

    The document index gets one extra epoch so that the last sample of the last epoch can take its
    final tokens from the next epoch's stream, as it would if more epochs were built.
    """
    tokens_per_epoch = int(document_lengths[documents].sum(dtype=np.int64))
    num_samples = samples_in_epochs(tokens_per_epoch, seq_length, num_epochs)
    document_index = build_document_index(documents, num_epochs + 1, seed, split_id)
    return {
        "document_index": document_index,
        "sample_index": build_sample_index(document_lengths, document_index, seq_length, num_samples),
        "shuffle_index": build_shuffle_index(tokens_per_epoch, seq_length, num_epochs, seed, split_id),
    }


class GPTDataset:
    """``num_samples`` samples of ``seq_length + 1`` int64 tokens from documents ``[first, last)`` of a file."""

    def __init__(self, source: TokenDocuments, split_name: str, split_id: int, document_range: tuple[int, int],
                 seq_length: int, num_samples: int, seed: int, cache_dir: str):
        self.source = source
        self.split_name = split_name
        self.seq_length = seq_length
        self.num_samples = num_samples
        first, last = document_range
        self.documents = np.arange(first, last, dtype=np.int64)
        self.tokens_per_epoch = int(source.doc_length[first:last].sum(dtype=np.int64))
        if self.tokens_per_epoch < seq_length + 1:
            raise DataError(
                f"{source.path!r} has {self.tokens_per_epoch} tokens in its {split_name} split "
                f"(documents {first}..{last - 1}), fewer than one sample of max_seq_length + 1 = {seq_length + 1} "
                f"tokens; lower max_seq_length, give this split a larger share, or drop this source"
            )
        self.num_epochs = epochs_needed(self.tokens_per_epoch, seq_length, num_samples)
        self.cache = IndexCache(
            cache_dir,
            name=f"{_safe_name(source.path)}-{split_name}",
            description={
                "source": os.path.basename(source.path),
                "document_lengths": hash_array(np.asarray(source.doc_length[first:last])),
                "document_range": [first, last],
                "split": split_name,
                "seq_length": seq_length,
                "seed": seed,
                "num_epochs": self.num_epochs,
            },
        )
        self._seed = seed
        self._split_id = split_id
        self._arrays = None

    def build_or_load(self) -> None:
        """Load the cached indices, building and caching them first when missing."""
        def build():
            return build_indices(self.source.doc_length, self.documents, self.seq_length, self.num_epochs,
                                 self._seed, self._split_id)

        self._arrays = self.cache.get_or_build(INDEX_ARRAYS, build)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> np.ndarray:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"sample {index} is out of range for a {self.split_name} dataset of {self.num_samples}")
        document_index = self._arrays["document_index"]
        sample_index = self._arrays["sample_index"]
        sample = int(self._arrays["shuffle_index"][index])
        first_row, first_offset = (int(v) for v in sample_index[sample])
        last_row, last_offset = (int(v) for v in sample_index[sample + 1])

        # The sample runs from (first_row, first_offset) to (last_row, last_offset) inclusive.
        starts, lengths = self.source.doc_start, self.source.doc_length
        if first_row == last_row:
            start = starts[document_index[first_row]] + first_offset
            pieces = [self.source.tokens[start : start + last_offset - first_offset + 1]]
        else:
            document = document_index[first_row]
            pieces = [self.source.tokens[starts[document] + first_offset : starts[document] + lengths[document]]]
            for row in range(first_row + 1, last_row):
                document = document_index[row]
                pieces.append(self.source.tokens[starts[document] : starts[document] + lengths[document]])
            document = document_index[last_row]
            pieces.append(self.source.tokens[starts[document] : starts[document] + last_offset + 1])
        sample_tokens = np.concatenate(pieces).astype(np.int64)
        assert len(sample_tokens) == self.seq_length + 1, (index, len(sample_tokens))
        return sample_tokens


def _safe_name(path: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in os.path.basename(path))
