"""Blending: interleave samples of several sources so that each source's share follows its weight.

Source d with normalized weight w_d gets its k-th sample at time ``(k + 0.5) / w_d``, and the
blend is all sources' samples sorted by time, ties going to the lower source number. After n
samples every source has been drawn ``round(w_d * n)`` times give or take one, and sample i is
the same however many samples are built, because each time depends only on k and w_d.
"""

import numpy as np

from fleetlm.data.index_cache import IndexCache

BLEND_ARRAYS = ["source_index", "source_sample_index"]


def build_blend_index(weights: list[float], num_samples: int) -> dict[str, np.ndarray]:
    """Return, for blended samples ``0..num_samples-1``, the source and the sample number within that source."""
    weights = np.asarray(weights, dtype=np.float64)
    weights = weights / weights.sum()
    # The n-th smallest time is at most n + len(weights) / 2, so each source needs its draws up to
    # that time. Two extra draws cover the rounding.
    draws = [int(np.ceil(w * (num_samples + len(weights)))) + 2 if w > 0 else 0 for w in weights]
    times = np.concatenate([(np.arange(n, dtype=np.float64) + 0.5) / w for n, w in zip(draws, weights) if n])
    sources = np.concatenate([np.full(n, d, dtype=np.int16) for d, n in enumerate(draws) if n])
    ranks = np.concatenate([np.arange(n, dtype=np.int64) for n in draws if n])
    order = np.lexsort((sources, times))[:num_samples]
    return {"source_index": sources[order], "source_sample_index": ranks[order]}


class BlendedDataset:
    """Samples drawn from several datasets in the proportions of their weights."""

    def __init__(self, datasets: list, weights: list[float], num_samples: int, cache: IndexCache,
                 blend: dict[str, np.ndarray]):
        self.datasets = datasets
        self.weights = weights
        self.num_samples = num_samples
        self.cache = cache
        self.source_index = blend["source_index"]
        self.source_sample_index = blend["source_sample_index"]

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> np.ndarray:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"sample {index} is out of range for a blended dataset of {self.num_samples}")
        source = int(self.source_index[index])
        return self.datasets[source][int(self.source_sample_index[index])]
