"""Plot a run's train and eval loss next to the unigram entropy of its training tokens.

The unigram entropy H = -sum_t p(t) ln p(t), over the token frequencies of the training split, is
the loss of the best model that ignores context; a language model that learned anything from
context must end clearly below it. Both are in nats per token, like the training loss.

usage: python scripts/plot_loss.py --output_dir OUT --input_dir PREFIX --split 9,1 --png docs/images/loss.png
"""

import argparse
import json
import os
import sys

import numpy as np


def unigram_entropy(prefix: str, split: str) -> tuple:
    """Return (entropy in nats, training tokens counted) over the train documents of ``prefix``."""
    from fleetlm.data.builder import parse_split, split_document_ranges
    from fleetlm.data.indexed_dataset import open_token_documents

    documents = open_token_documents(prefix)
    start, stop = split_document_ranges(parse_split(split), documents.num_documents)[0]
    first, last = int(documents.doc_start[start]), int(documents.doc_start[stop - 1] + documents.doc_length[stop - 1])
    counts = np.bincount(np.asarray(documents.tokens[first:last], dtype=np.int64))
    total = int(counts.sum())
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum()), total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True, help="run output_dir holding metrics.jsonl")
    parser.add_argument("--input_dir", required=True, help="token file prefix the run trained on")
    parser.add_argument("--split", required=True, help="the run's split string, e.g. 9,1")
    parser.add_argument("--png", required=True, help="where to write the plot")
    parser.add_argument("--title", default="fleetlm demo: LLaMA on Shakespeare")
    args = parser.parse_args()

    with open(os.path.join(args.output_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if not train:
        print(f"{args.output_dir}/metrics.jsonl has no training records", file=sys.stderr)
        return 1
    entropy, total = unigram_entropy(args.input_dir, args.split)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    ax.plot(*zip(*train), label="train loss", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss (valid split)", linewidth=1.5)
    ax.axhline(entropy, color="gray", linestyle="--", label=f"unigram entropy {entropy:.3f} nats")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross entropy (nats/token)")
    ax.set_title(args.title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.png)), exist_ok=True)
    fig.savefig(args.png)

    print(f"unigram entropy of the training split: {entropy:.4f} nats/token over {total} tokens")
    print(f"first train loss: {train[0][1]:.4f} (step {train[0][0]}); last: {train[-1][1]:.4f} (step {train[-1][0]})")
    if evals:
        gap = entropy - evals[-1][1]
        print(f"last eval loss: {evals[-1][1]:.4f} (step {evals[-1][0]}), "
              f"{abs(gap):.4f} nats {'below' if gap >= 0 else 'above'} the unigram entropy")
    print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
