"""Benchmark the data pipeline: preprocessing throughput and index build time.

    python benchmarks/bench_data.py                      # all four tokenizers, 1 and 2 workers
    python benchmarks/bench_data.py --tokenizers gpt2 --workers 1 2 4 --copies 32

Preprocessing: the Shakespeare demo plays, cut into documents of 100 lines and repeated
``--copies`` times, are written as one .jsonl file. The bare tokenizer's rate is
``tokenizer.encode`` over the same document texts in memory, one process. The pipeline's rate is
``tokenize_corpus`` on the file, end to end (reading, JSON parsing, tokenizing, writing) and also
without the one-off tokenizer load, which a larger corpus amortizes.

Index build: synthetic document lengths (log-normal, mean about 1,000 tokens) adding up to
``--index_tokens`` tokens, indexed for one epoch of ``--seq_length`` samples on one core.
"""

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from fleetlm.data.gpt_dataset import build_indices, epochs_needed  # noqa: E402
from fleetlm.data.index_cache import hash_array  # noqa: E402
from fleetlm.data.preprocess import tokenize_corpus  # noqa: E402
from fleetlm.tokenizer import load_tokenizer  # noqa: E402

TOKENIZERS = {
    "gpt2": "tests/assets/tokenizers/gpt2/gpt2.tiktoken",
    "qwen": "tests/assets/tokenizers/qwen/qwen.tiktoken",
    "mistral-spm": "tests/assets/tokenizers/mistral-spm/tokenizer.model",
    "chatglm3": "tests/assets/tokenizers/chatglm3/tokenizer.json",
}
SHAKESPEARE_DIR = os.path.join(REPO_ROOT, "examples", "data", "shakespeare")


def make_corpus(path: str, copies: int) -> list[str]:
    """Write the plays as 100-line documents, ``copies`` times over, to a .jsonl file; return the texts."""
    documents = []
    for name in sorted(os.listdir(SHAKESPEARE_DIR)):
        if name.endswith(".txt"):
            with open(os.path.join(SHAKESPEARE_DIR, name), encoding="utf-8") as handle:
                lines = handle.read().split("\n")
            documents += ["\n".join(lines[i : i + 100]) for i in range(0, len(lines), 100)]
    documents = [document for document in documents if document.strip()] * copies
    with open(path, "w", encoding="utf-8") as handle:
        for document in documents:
            handle.write(json.dumps({"text": document}, ensure_ascii=False) + "\n")
    return documents


def best_seconds(run, repeats: int) -> float:
    """Return the shortest wall time of ``repeats`` calls, which filters out noise from other processes."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_tokenizer(name: str, corpus: str, documents: list[str], workers_list: list[int], output_dir: str,
                    repeats: int) -> None:
    path = os.path.join(REPO_ROOT, TOKENIZERS[name])
    load_seconds = best_seconds(lambda: load_tokenizer(path), repeats)
    tokenizer = load_tokenizer(path)
    num_tokens = sum(len(tokenizer.encode(document)) for document in documents)

    # Bare and pipeline runs alternate, so that load from other processes hits both alike.
    bare_times = {}
    pipeline_times = {workers: [] for workers in workers_list}
    for _ in range(repeats):
        # Only the lengths are kept, so that holding every id list does not slow the bare loop down.
        bare_times.setdefault("bare", []).append(
            best_seconds(lambda: [len(tokenizer.encode(document)) for document in documents], 1))
        for workers in workers_list:
            prefix = os.path.join(output_dir, f"{name}_{workers}")
            pipeline_times[workers].append(
                best_seconds(lambda: tokenize_corpus(corpus, path, prefix, workers=workers), 1))
            assert os.path.getsize(prefix + ".bin") == num_tokens * (4 if tokenizer.vocab_size > 65536 else 2)

    bare_rate = num_tokens / min(bare_times["bare"])
    print(f"{name:12s} bare tokenizer.encode, 1 process: {bare_rate / 1e6:5.2f} M tokens/s "
          f"(tokenizer load {load_seconds:.2f} s)")
    for workers in workers_list:
        seconds = min(pipeline_times[workers])
        per_worker = num_tokens / seconds / workers
        # The tokenizer load is paid once per run (and once per worker process); a larger corpus amortizes it.
        per_worker_steady = num_tokens / (seconds - load_seconds) / workers
        print(f"{name:12s} pipeline, {workers} worker{'s' if workers > 1 else ' '}: "
              f"{num_tokens / seconds / 1e6:5.2f} M tokens/s end to end = {per_worker / 1e6:5.2f} per worker "
              f"({per_worker / bare_rate:4.0%} of bare); excluding one tokenizer load "
              f"{per_worker_steady / 1e6:5.2f} per worker ({per_worker_steady / bare_rate:4.0%})")


def bench_index(total_tokens: int, seq_length: int, repeats: int) -> None:
    rng = np.random.default_rng(0)
    # Log-normal with sigma 1 has mean exp(mu + 0.5): mu = ln(1000) - 0.5 gives about 1,000 tokens a document.
    lengths = np.maximum(1, rng.lognormal(np.log(1000) - 0.5, 1.0, size=int(total_tokens / 1000 * 1.1)))
    lengths = lengths.astype(np.int64)
    cumulative = np.cumsum(lengths)
    lengths = lengths[: np.searchsorted(cumulative, total_tokens) + 1]
    documents = np.arange(len(lengths), dtype=np.int64)
    tokens = int(lengths.sum())
    num_samples = (tokens - 1) // seq_length

    num_epochs = epochs_needed(tokens, seq_length, num_samples)

    def build():
        # The cache key hashes the document lengths, so that is part of the build cost.
        hash_array(lengths)
        return build_indices(lengths, documents, seq_length, num_epochs, seed=1234, split_id=0)

    seconds = best_seconds(build, repeats)
    print(f"index build: {tokens / 1e9:.2f} B tokens, {len(lengths):,} documents, seq_length {seq_length}, "
          f"{len(build()['shuffle_index']):,} samples, {num_epochs} epoch, 1 core: {seconds:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizers", nargs="+", default=list(TOKENIZERS), choices=list(TOKENIZERS))
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2], help="worker counts to run")
    parser.add_argument("--copies", type=int, default=16, help="times the demo plays are repeated in the corpus")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each measurement; the fastest is reported")
    parser.add_argument("--index_tokens", type=float, default=1e9, help="tokens in the synthetic index benchmark")
    parser.add_argument("--seq_length", type=int, default=4096, help="sequence length of the index benchmark")
    args = parser.parse_args()

    print(f"python {sys.version.split()[0]}, numpy {np.__version__}, {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as directory:
        corpus = os.path.join(directory, "corpus.jsonl")
        documents = make_corpus(corpus, args.copies)
        print(f"corpus: {len(documents):,} documents, {os.path.getsize(corpus) / 1e6:.1f} MB of jsonl")
        for name in args.tokenizers:
            bench_tokenizer(name, corpus, documents, args.workers, directory, args.repeats)
    bench_index(int(args.index_tokens), args.seq_length, args.repeats)


if __name__ == "__main__":
    main()
