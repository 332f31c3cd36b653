"""Sample, document and shuffle indices, splits, caching, blending and resumption."""

import glob
import os

import numpy as np
import pytest

import fleetlm.data.blended_dataset as blended_dataset_module
import fleetlm.data.gpt_dataset as gpt_dataset_module
import fleetlm.data.index_cache as index_cache_module
from fleetlm.data import DataError, build_pretraining_datasets
from fleetlm.data.blended_dataset import build_blend_index
from fleetlm.data.builder import parse_input_dir, parse_split, split_document_ranges
from fleetlm.data.indexed_dataset import IndexedDatasetWriter, open_token_documents


def write_token_file(prefix: str, lengths, seed: int = 0, low: int = 0, high: int = 1000) -> list[list[int]]:
    """Write documents of the given lengths with random ids in [low, high); return them."""
    rng = np.random.default_rng(seed)
    documents = [rng.integers(low, high, size=length).tolist() for length in lengths]
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        for document in documents:
            writer.add_document(np.array(document, dtype=np.uint16))
        writer.finalize()
    return documents


@pytest.fixture()
def small_file(tmp_path) -> str:
    """100 documents of 0 to 39 tokens (one empty), about 2,000 tokens."""
    lengths = np.random.default_rng(7).integers(1, 40, size=100)
    lengths[13] = 0
    prefix = str(tmp_path / "small")
    write_token_file(prefix, lengths)
    return prefix


def reference_epochs(tokens_per_epoch: int, seq_length: int, num_samples: int) -> int:
    """Count epochs one at a time until the stream contains num_samples samples of seq_length + 1 tokens."""
    epochs = 1
    while (epochs * tokens_per_epoch - 1) // seq_length < num_samples:
        epochs += 1
    return epochs


def reference_stream(documents, document_order) -> list[int]:
    """Concatenate the documents in the given order with a plain Python loop."""
    stream = []
    for document in document_order:
        stream.extend(documents.document(int(document)).tolist())
    return stream


def test_samples_match_reference_walk(small_file):
    seq_length, num_samples = 16, 400
    train, _, _ = build_pretraining_datasets(small_file, "90,10", seq_length, seed=3, num_samples=(num_samples, 0, 0))
    documents = open_token_documents(small_file)
    first, last = split_document_ranges(parse_split("90,10"), documents.num_documents)[0]
    tokens_per_epoch = sum(len(documents.document(d)) for d in range(first, last))
    arrays = train._arrays

    # Document index: one permutation of the split's documents per epoch, plus one extra epoch.
    epochs = reference_epochs(tokens_per_epoch, seq_length, num_samples)
    assert train.num_epochs == epochs
    assert epochs > 3
    document_index = np.asarray(arrays["document_index"])
    assert len(document_index) == (epochs + 1) * (last - first)
    for epoch in range(epochs + 1):
        block = document_index[epoch * (last - first) : (epoch + 1) * (last - first)]
        assert sorted(block.tolist()) == list(range(first, last))

    # Shuffle index: a permutation within each epoch's samples, where a sample belongs to the epoch of its first token.
    shuffle_index = np.asarray(arrays["shuffle_index"])
    sample_epoch = [(s * seq_length) // tokens_per_epoch for s in range(len(shuffle_index))]
    assert sorted(shuffle_index.tolist()) == list(range(len(shuffle_index)))
    for position, sample in enumerate(shuffle_index):
        assert sample_epoch[int(sample)] == sample_epoch[position]

    # Every sample is S + 1 consecutive tokens of the stream, starting at a multiple of S.
    stream = reference_stream(documents, document_index)
    for i in range(num_samples):
        start = int(shuffle_index[i]) * seq_length
        sample = train[i]
        assert sample.dtype == np.int64
        assert sample.shape == (seq_length + 1,)
        assert sample.tolist() == stream[start : start + seq_length + 1], f"sample {i}"


def test_epoch_consecutive_samples_share_one_token(small_file):
    # Enough samples that the first epoch's block (about 267 samples) lies inside the dataset.
    train, _, _ = build_pretraining_datasets(small_file, "1", 8, seed=1, num_samples=(1000, 0, 0))
    inverse = np.argsort(np.asarray(train._arrays["shuffle_index"]))
    for sample in range(20):
        current, following = train[int(inverse[sample])], train[int(inverse[sample + 1])]
        assert current[-1] == following[0]


def test_more_samples_keep_earlier_ones(small_file):
    short, _, _ = build_pretraining_datasets(small_file, "1", 16, seed=5, num_samples=(100, 0, 0))
    long, _, _ = build_pretraining_datasets(small_file, "1", 16, seed=5, num_samples=(1000, 0, 0))
    assert long.num_epochs > short.num_epochs
    for i in range(100):
        assert np.array_equal(short[i], long[i]), f"sample {i}"


def test_resume_from_consumed_samples(small_file):
    # A first run consumes 137 samples; the restarted run builds a fresh dataset for a longer
    # schedule and continues at index 137. Together they must equal one uninterrupted run.
    consumed = 137
    first_run, _, _ = build_pretraining_datasets(small_file, "1", 16, seed=9, num_samples=(300, 0, 0))
    restarted, _, _ = build_pretraining_datasets(small_file, "1", 16, seed=9, num_samples=(600, 0, 0))
    uninterrupted, _, _ = build_pretraining_datasets(small_file, "1", 16, seed=9, num_samples=(600, 0, 0))
    stream = [first_run[i] for i in range(consumed)] + [restarted[i] for i in range(consumed, 600)]
    expected = [uninterrupted[i] for i in range(600)]
    assert all(np.array_equal(a, b) for a, b in zip(stream, expected))


def test_seed_changes_order(small_file):
    seed_1, _, _ = build_pretraining_datasets(small_file, "1", 16, seed=1, num_samples=(50, 0, 0))
    seed_2, _, _ = build_pretraining_datasets(small_file, "1", 16, seed=2, num_samples=(50, 0, 0))
    assert any(not np.array_equal(seed_1[i], seed_2[i]) for i in range(50))


def test_index_out_of_range(small_file):
    train, _, _ = build_pretraining_datasets(small_file, "1", 16, seed=1, num_samples=(10, 0, 0))
    assert len(train) == 10
    with pytest.raises(IndexError):
        train[10]


@pytest.mark.parametrize(
    "split, num_documents, expected",
    [
        ("949,50,1", 1000, [(0, 949), (949, 999), (999, 1000)]),
        ("98,2", 100, [(0, 98), (98, 100), (100, 100)]),
        ("1,0,0", 37, [(0, 37), (37, 37), (37, 37)]),
        ("949,50,1", 10, [(0, 9), (9, 10), (10, 10)]),
        ("1,1,1", 10, [(0, 3), (3, 7), (7, 10)]),
    ],
)
def test_split_boundaries(split, num_documents, expected):
    assert split_document_ranges(parse_split(split), num_documents) == expected


def test_splits_are_disjoint(small_file):
    train, valid, test = build_pretraining_datasets(small_file, "80,10,10", 8, seed=1, num_samples=(20, 20, 20))
    ranges = [set(dataset.documents.tolist()) for dataset in (train, valid, test)]
    assert ranges[0] == set(range(0, 80))
    assert ranges[1] == set(range(80, 90))
    assert ranges[2] == set(range(90, 100))
    assert set(np.asarray(valid._arrays["document_index"]).tolist()) == ranges[1]


@pytest.mark.parametrize(
    "split, expected",
    [
        ("-1,2,3", "invalid field '-1'"),
        ("a,b", "non-numeric field 'a'"),
        ("1,,2", "non-numeric field ''"),
        ("0,0,0", "gives every split weight 0"),
        ("1,2,3,4", "has 4 fields"),
        ("nan,1", "invalid field 'nan'"),
        ("1e308,1e308", "sums to more than the largest float"),
    ],
)
def test_bad_split_rejected(split, expected):
    with pytest.raises(DataError) as error:
        parse_split(split)
    assert expected in str(error.value)
    assert repr(split) in str(error.value)


def test_needed_empty_split_rejected(small_file):
    with pytest.raises(DataError) as error:
        build_pretraining_datasets(small_file, "100,0,0", 8, seed=1, num_samples=(10, 5, 0))
    message = str(error.value)
    assert "the valid split of" in message
    assert "is empty" in message
    assert "5 valid samples are needed" in message


def test_unused_split_returns_none(small_file):
    train, valid, test = build_pretraining_datasets(small_file, "100,0,0", 8, seed=1, num_samples=(10, 0, 0))
    assert len(train) == 10
    assert valid is None
    assert test is None


def test_source_shorter_than_one_sample(tmp_path):
    write_token_file(str(tmp_path / "big"), [500] * 10)
    write_token_file(str(tmp_path / "tiny"), [3, 4])
    with pytest.raises(DataError) as error:
        build_pretraining_datasets(f"1 {tmp_path}/big 1 {tmp_path}/tiny", "1", 16, seed=1, num_samples=(10, 0, 0))
    message = str(error.value)
    assert f"{tmp_path}/tiny" in message
    assert "has 7 tokens in its train split" in message
    assert "max_seq_length + 1 = 17" in message


@pytest.mark.parametrize("max_seq_length, num_samples, expected", [
    (0, (1, 0, 0), "max_seq_length must be a positive integer"),
    (8, (1, 0), "num_samples must be three integers"),
    (8, (-1, 0, 0), "num_samples must be three integers"),
])
def test_bad_arguments_rejected(small_file, max_seq_length, num_samples, expected):
    with pytest.raises(DataError, match=expected):
        build_pretraining_datasets(small_file, "1", max_seq_length, seed=1, num_samples=num_samples)


def cache_entries(directory: str) -> set[str]:
    return {os.path.basename(path) for path in glob.glob(os.path.join(directory, "index-cache", "*.json"))}


def test_cache_reused(small_file, monkeypatch):
    build_pretraining_datasets(small_file, "1", 16, seed=1, num_samples=(100, 0, 0))
    entries = cache_entries(os.path.dirname(small_file))

    def fail(*args, **kwargs):
        raise AssertionError("the index was rebuilt instead of read from the cache")

    monkeypatch.setattr(gpt_dataset_module, "build_indices", fail)
    train, _, _ = build_pretraining_datasets(small_file, "1", 16, seed=1, num_samples=(100, 0, 0))
    assert len(train[99]) == 17
    assert cache_entries(os.path.dirname(small_file)) == entries


@pytest.mark.parametrize("change", [
    {"max_seq_length": 32},
    {"split": "50,50"},
    {"seed": 2},
])
def test_cache_invalidated(small_file, change):
    settings = {"split": "1", "max_seq_length": 16, "seed": 1}
    build_pretraining_datasets(small_file, num_samples=(20, 0, 0), **settings)
    before = cache_entries(os.path.dirname(small_file))
    build_pretraining_datasets(small_file, num_samples=(20, 0, 0), **dict(settings, **change))
    after = cache_entries(os.path.dirname(small_file))
    assert len(after - before) == 1


def test_cache_invalidated_by_new_data(tmp_path):
    prefix = str(tmp_path / "data")
    write_token_file(prefix, [50] * 20, seed=0)
    build_pretraining_datasets(prefix, "1", 16, seed=1, num_samples=(20, 0, 0))
    # Same name, different document lengths.
    write_token_file(prefix, [60] * 20, seed=0)
    train, _, _ = build_pretraining_datasets(prefix, "1", 16, seed=1, num_samples=(20, 0, 0))
    assert len(cache_entries(str(tmp_path))) == 2
    assert train.tokens_per_epoch == 1200


def _truncate(path: str) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(os.path.getsize(path) - 8)


def _change_one_value(path: str) -> None:
    array = np.load(path)
    array.flat[-1] += 1
    np.save(path, array)


DAMAGE = {
    "truncated array": ("-sample_index.npy", _truncate),
    "changed array": ("-shuffle_index.npy", _change_one_value),
    "missing array": ("-document_index.npy", os.remove),
    "garbage description": (".json", lambda path: open(path, "w").write("{not json")),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_cache_entry_rebuilt(small_file, monkeypatch, damage):
    expected, _, _ = build_pretraining_datasets(small_file, "1", 16, seed=1, num_samples=(50, 0, 0))
    expected = [expected[i].copy() for i in range(50)]
    (description,) = glob.glob(os.path.join(os.path.dirname(small_file), "index-cache", "*.json"))
    suffix, apply = DAMAGE[damage]
    apply(description.removesuffix(".json") + suffix)
    warnings = []
    monkeypatch.setattr(index_cache_module.logger, "warning", lambda message, *args: warnings.append(message % args))

    train, _, _ = build_pretraining_datasets(small_file, "1", 16, seed=1, num_samples=(50, 0, 0))
    assert len(warnings) == 1
    assert warnings[0].startswith("rebuilding index small-train-")
    assert all(np.array_equal(train[i], expected[i]) for i in range(50))
    # The rebuilt entry is whole again: a third run reads it without a warning.
    build_pretraining_datasets(small_file, "1", 16, seed=1, num_samples=(50, 0, 0))
    assert len(warnings) == 1


def test_data_cache_directory(small_file, tmp_path):
    cache = str(tmp_path / "elsewhere")
    build_pretraining_datasets(small_file, "1", 16, seed=1, num_samples=(20, 0, 0), data_cache=cache)
    assert len(glob.glob(os.path.join(cache, "*.json"))) == 1
    assert not os.path.exists(os.path.join(os.path.dirname(small_file), "index-cache"))


def test_other_ranks_read_rank0_cache(small_file, monkeypatch):
    calls = []
    rank0, _, _ = build_pretraining_datasets(small_file, "1", 16, seed=1, num_samples=(50, 0, 0), rank=0,
                                             barrier=lambda: calls.append("rank0"))

    def fail(*args, **kwargs):
        raise AssertionError("rank 1 built an index that rank 0 had cached")

    monkeypatch.setattr(gpt_dataset_module, "build_indices", fail)
    rank1, _, _ = build_pretraining_datasets(small_file, "1", 16, seed=1, num_samples=(50, 0, 0), rank=1,
                                             barrier=lambda: calls.append("rank1"))
    assert calls == ["rank0", "rank1"]
    assert all(np.array_equal(rank0[i], rank1[i]) for i in range(50))


def test_rank0_failure_still_reaches_barrier(tmp_path):
    calls = []
    write_token_file(str(tmp_path / "tiny"), [3])
    with pytest.raises(DataError):
        build_pretraining_datasets(str(tmp_path / "tiny"), "1", 16, seed=1, num_samples=(5, 0, 0), rank=0,
                                   barrier=lambda: calls.append("barrier"))
    assert calls == ["barrier"]


def make_sources(tmp_path) -> str:
    """Three sources whose ids lie in disjoint ranges: a in [0, 100), b in [100, 200), c in [200, 300)."""
    write_token_file(str(tmp_path / "a"), [300] * 20, seed=1, low=0, high=100)
    write_token_file(str(tmp_path / "b"), [100] * 30, seed=2, low=100, high=200)
    write_token_file(str(tmp_path / "c"), [1000] * 5, seed=3, low=200, high=300)
    return f"2 {tmp_path}/a 3 {tmp_path}/b 5 {tmp_path}/c"


def test_blend_ratios_follow_weights(tmp_path):
    input_dir = make_sources(tmp_path)
    num_samples = 20000
    train, _, _ = build_pretraining_datasets(input_dir, "1", 8, seed=1, num_samples=(num_samples, 0, 0))
    counts = np.bincount(np.asarray(train.source_index), minlength=3)
    for count, weight in zip(counts, (0.2, 0.3, 0.5)):
        assert abs(count / num_samples - weight) <= 0.01 * weight
    # No source is asked for a sample it does not have.
    for source, dataset in enumerate(train.datasets):
        drawn = np.asarray(train.source_sample_index)[np.asarray(train.source_index) == source]
        assert drawn.max() < len(dataset) == counts[source]
        assert len(np.unique(drawn)) == len(drawn)


def test_blend_samples_come_from_their_source(tmp_path):
    input_dir = make_sources(tmp_path)
    train, _, _ = build_pretraining_datasets(input_dir, "1", 8, seed=1, num_samples=(300, 0, 0))
    for i in range(300):
        source = int(train.source_index[i])
        sample = train[i]
        assert sample.min() >= 100 * source, f"sample {i} has ids from outside source {source}"
        assert sample.max() < 100 * (source + 1), f"sample {i} has ids from outside source {source}"


def test_blend_prefix_stable():
    short = build_blend_index([0.2, 0.3, 0.5], 1000)
    long = build_blend_index([0.2, 0.3, 0.5], 5000)
    assert np.array_equal(short["source_index"], long["source_index"][:1000])
    assert np.array_equal(short["source_sample_index"], long["source_sample_index"][:1000])


def test_blend_resume(tmp_path):
    input_dir = make_sources(tmp_path)
    short, _, _ = build_pretraining_datasets(input_dir, "1", 8, seed=4, num_samples=(500, 0, 0))
    long, _, _ = build_pretraining_datasets(input_dir, "1", 8, seed=4, num_samples=(2000, 0, 0))
    assert all(np.array_equal(short[i], long[i]) for i in range(500))


def test_blend_cache_reused(tmp_path, monkeypatch):
    input_dir = make_sources(tmp_path)
    build_pretraining_datasets(input_dir, "1", 8, seed=1, num_samples=(100, 0, 0))

    def fail(*args, **kwargs):
        raise AssertionError("the blend index was rebuilt")

    monkeypatch.setattr(blended_dataset_module, "build_blend_index", fail)
    import fleetlm.data.builder as builder_module

    monkeypatch.setattr(builder_module, "build_blend_index", fail)
    train, _, _ = build_pretraining_datasets(input_dir, "1", 8, seed=1, num_samples=(100, 0, 0))
    assert len(train) == 100


def test_directory_input_weights_each_file_equally(tmp_path):
    make_sources(tmp_path)
    sources = parse_input_dir(str(tmp_path))
    assert [os.path.basename(source.prefix) for source in sources] == ["a", "b", "c"]
    assert [source.weight for source in sources] == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("input_dir, expected", [
    ("1 a 2", "has 3 fields"),
    ("x a 1 b", "the weight 'x' (for 'a'), which is not a number"),
    ("-1 a 1 b", "gives 'a' the invalid weight '-1'"),
    ("0 a 0 b", "gives every source weight 0"),
    ("", "input_dir is empty"),
    ("0.5 data/a 1 data/b 0.25 data/./a", "names 'data/./a' twice (weights 0.5 and 0.25); give it once with the "
                                         "summed weight 0.75"),
    ("1e308 a 1e308 b", "sum to more than the largest float"),
])
def test_bad_input_dir_rejected(input_dir, expected):
    with pytest.raises(DataError) as error:
        parse_input_dir(input_dir)
    assert expected in str(error.value)


def test_missing_prefix_rejected(tmp_path):
    with pytest.raises(DataError, match="is neither a directory nor the prefix of a token file"):
        parse_input_dir(str(tmp_path / "missing"))


def test_empty_directory_rejected(tmp_path):
    with pytest.raises(DataError, match="no token files"):
        parse_input_dir(str(tmp_path))


def test_shakespeare_demo_datasets(shakespeare_gpt2):
    train, valid, test = build_pretraining_datasets(shakespeare_gpt2, "949,50,1", 256, seed=1234,
                                                    num_samples=(2000, 50, 0))
    assert (len(train), len(valid), test) == (2000, 50, None)
    # 10 plays: 9 for training, 1 for validation.
    assert len(train.documents) == 9
    assert len(valid.documents) == 1
    assert train[1999].max() <= 50256
