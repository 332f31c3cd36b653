"""Benchmark the data pipeline: preprocessing throughput against the bare tokenizer, and index build time.

    python benchmarks/bench_data.py                      # all four tokenizers, 1 worker and 1 per core
    python benchmarks/bench_data.py --tokenizers gpt2 --workers 1 2 4 --corpus_mb 200
    python benchmarks/bench_data.py --corpus poetry --index_tokens 1e7   # short Chinese documents only

Preprocessing: every document of the bundled corpora (``--corpus``: the Shakespeare plays cut into
100-line documents, each poem and chapter of examples/data/chinese-poetry, or both) is written to a
temporary .jsonl file, the whole set again and again until the file reaches ``--corpus_mb`` MB. ``tokenize_corpus``
then runs on that file end to end: reading, JSON parsing, tokenizing, writing .bin/.idx, and one
tokenizer load in the main process, which is also timed on its own.

The bare tokenizer runs on every document of the corpus file, read into memory beforehand, in one
process, in two ways: ``tokenizer.encode`` on each document, and ``tokenizer.encode_batch_flat`` (the call the
pipeline makes) on the documents of each copy of the corpus. The pipeline is measured against the
faster of the two. Each figure is the fastest of ``--repeats`` runs, to filter out other processes on
the machine.

Besides wall time, the benchmark reads the CPU time of the main process and of the worker
processes (``resource.RUSAGE_CHILDREN``). Tokens per CPU second do not depend on how many cores
other jobs leave free, so they show the cost of the pipeline even on a busy machine.

Index build: synthetic document lengths (log-normal, mean about 1,000 tokens) adding up to
``--index_tokens`` tokens, indexed for one epoch of ``--seq_length`` samples on one core.
"""

import argparse
import json
import os
import resource
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
POETRY_DIR = os.path.join(REPO_ROOT, "examples", "data", "chinese-poetry")


def bundled_documents(corpus: str = "mixed") -> list[str]:
    """Return the plays as 100-line documents ("plays"), every poem and chapter of the poetry files
    ("poetry"), or both, plays first ("mixed")."""
    documents = []
    if corpus in ("mixed", "plays"):
        for name in sorted(os.listdir(SHAKESPEARE_DIR)):
            if name.endswith(".txt"):
                with open(os.path.join(SHAKESPEARE_DIR, name), encoding="utf-8") as handle:
                    lines = handle.read().split("\n")
                documents += ["\n".join(lines[i : i + 100]) for i in range(0, len(lines), 100)]
    if corpus in ("mixed", "poetry"):
        for name in sorted(os.listdir(POETRY_DIR)):
            if name.endswith(".json"):
                with open(os.path.join(POETRY_DIR, name), encoding="utf-8") as handle:
                    documents += ["\n".join(record["paragraphs"]) for record in json.load(handle)]
    return [document for document in documents if document.strip()]


def write_corpus(path: str, documents: list[str], megabytes: float) -> int:
    """Write ``documents`` to a .jsonl file again and again until it reaches ``megabytes`` MB; return the copies."""
    body = "".join(json.dumps({"text": document}, ensure_ascii=False) + "\n" for document in documents)
    body = body.encode("utf-8")
    copies = max(1, int(np.ceil(megabytes * 1e6 / len(body))))
    with open(path, "wb") as handle:
        for _ in range(copies):
            handle.write(body)
    return copies


class Timing:
    """Wall time and CPU time (this process, and its finished child processes) of one call."""

    def __init__(self, run):
        wall, cpu, children = time.perf_counter(), time.process_time(), _children_cpu()
        self.value = run()
        self.wall = time.perf_counter() - wall
        self.main_cpu = time.process_time() - cpu
        self.workers_cpu = _children_cpu() - children


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def fastest(timings: list[Timing]) -> Timing:
    return min(timings, key=lambda timing: timing.wall)


def bench_tokenizer(name: str, corpus: str, documents: list[str], copies: int, workers_list: list[int],
                    output_dir: str, repeats: int) -> None:
    path = os.path.join(REPO_ROOT, TOKENIZERS[name])
    load = fastest([Timing(lambda: load_tokenizer(path)) for _ in range(repeats)])
    tokenizer = load.value
    tokens_per_copy = sum(len(tokenizer.encode(document)) for document in documents)
    num_tokens = tokens_per_copy * copies
    # The bare tokenizer reads the texts of the corpus file: one string object a document, as the
    # pipeline has. Encoding the same 1,520 strings again and again runs partly from the CPU caches,
    # which a corpus without repeats does not (measured: 5 to 10% faster on Qwen).
    with open(corpus, encoding="utf-8") as handle:
        corpus_texts = [json.loads(line)["text"] for line in handle]

    # Bare and pipeline runs alternate, so that load from other processes hits both alike.
    bare = {"encode": [], "encode_batch_flat": []}
    pipeline = {workers: [] for workers in workers_list}
    for _ in range(repeats):
        # Only the lengths are kept, so that holding every id list does not slow the bare loop down.
        bare["encode"].append(Timing(lambda: [len(tokenizer.encode(text)) for text in corpus_texts]))
        # The call the pipeline makes, here once per copy of the documents (the pipeline: once per 1 MiB task).
        bare["encode_batch_flat"].append(Timing(lambda: [
            len(tokenizer.encode_batch_flat(corpus_texts[start : start + len(documents)])[0])
            for start in range(0, len(corpus_texts), len(documents))
        ]))
        for workers in workers_list:
            prefix = os.path.join(output_dir, f"{name}_{workers}")
            pipeline[workers].append(Timing(lambda: tokenize_corpus(corpus, path, prefix, workers=workers)))
            assert pipeline[workers][-1].value.tokens_written == num_tokens

    print(f"{name}: {num_tokens / 1e6:.1f} M tokens; tokenizer load {load.wall:.3f} s")
    for call, timings in bare.items():
        run = fastest(timings)
        print(f"  bare tokenizer.{call}, 1 process: {num_tokens / run.wall / 1e6:.2f} M tokens/s "
              f"({num_tokens / run.main_cpu / 1e6:.2f} per CPU second)")
    # The pipeline is measured against the faster of the two calls.
    bare_run = fastest([fastest(timings) for timings in bare.values()])
    bare_rate = num_tokens / bare_run.wall
    bare_cpu_rate = num_tokens / bare_run.main_cpu
    for workers in workers_list:
        run = fastest(pipeline[workers])
        per_worker = num_tokens / run.wall / workers
        # The worker processes do the tokenizing; with one worker the main process does it all.
        tokenizing_cpu = run.workers_cpu if workers > 1 else run.main_cpu
        per_cpu = num_tokens / tokenizing_cpu
        total_cpu = run.main_cpu + run.workers_cpu
        print(f"  {workers} worker{'s' if workers > 1 else ' '}: {run.wall:6.2f} s, "
              f"{num_tokens / run.wall / 1e6:5.2f} M tokens/s, {per_worker / 1e6:5.2f} per worker "
              f"= {per_worker / bare_rate:4.0%} of bare | CPU s: main {run.main_cpu:5.2f}, "
              f"workers {run.workers_cpu:6.2f}; {per_cpu / 1e6:5.2f} M tokens per worker CPU second "
              f"= {per_cpu / bare_cpu_rate:4.0%} of bare; all processes {num_tokens / total_cpu / bare_cpu_rate:4.0%}")


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

    run = fastest([Timing(build) for _ in range(repeats)])
    print(f"index build: {tokens / 1e9:.2f} B tokens, {len(lengths):,} documents, seq_length {seq_length}, "
          f"{len(run.value['shuffle_index']):,} samples, {num_epochs} epoch, 1 core: {run.wall:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizers", nargs="+", default=list(TOKENIZERS), choices=list(TOKENIZERS))
    parser.add_argument("--workers", nargs="+", type=int, default=sorted({1, os.cpu_count() or 1}),
                        help="worker counts to run (default: 1 and the number of CPUs)")
    parser.add_argument("--corpus", default="mixed", choices=["mixed", "plays", "poetry"],
                        help="documents to repeat: the plays in 100-line documents (about 2,700 characters each), "
                             "the poems (about 120 characters each), or both")
    parser.add_argument("--corpus_mb", type=float, default=100,
                        help="size of the generated .jsonl corpus in MB; large enough to amortize the tokenizer load")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each measurement; the fastest is reported")
    parser.add_argument("--index_tokens", type=float, default=1e9, help="tokens in the synthetic index benchmark")
    parser.add_argument("--seq_length", type=int, default=4096, help="sequence length of the index benchmark")
    args = parser.parse_args()

    print(f"python {sys.version.split()[0]}, numpy {np.__version__}, {os.cpu_count()} CPUs")
    documents = bundled_documents(args.corpus)
    with tempfile.TemporaryDirectory() as directory:
        corpus = os.path.join(directory, "corpus.jsonl")
        copies = write_corpus(corpus, documents, args.corpus_mb)
        print(f"corpus: {len(documents):,} documents x {copies} copies = {len(documents) * copies:,} documents, "
              f"{os.path.getsize(corpus) / 1e6:.1f} MB of jsonl")
        for name in args.tokenizers:
            bench_tokenizer(name, corpus, documents, copies, args.workers, directory, args.repeats)
    bench_index(int(args.index_tokens), args.seq_length, args.repeats)


if __name__ == "__main__":
    main()
