"""Synthetic token files for smoke tests: ``python -m fleetlm.data.synthetic data/debug_pattern``.

Every document is an arithmetic sequence of token ids (start, start + stride, ... modulo the
vocabulary), so a model learns it within a few steps and a loss curve visibly moves. The bundled
``*-debug.json`` argument files read ``./data/debug_pattern``, made by the command above.
"""

import argparse
import os

import numpy as np

from fleetlm.data.indexed_dataset import IndexedDatasetWriter

# The vocabulary of the fleetlm/tiny-* models that the debug argument files name.
DEBUG_VOCAB_SIZE = 512


def write_pattern_tokens(prefix: str, num_documents: int = 300, vocab_size: int = DEBUG_VOCAB_SIZE,
                         seed: int = 0) -> str:
    """Write ``PREFIX.bin/.idx`` of ``num_documents`` arithmetic sequences of 20-299 ids below ``vocab_size``."""
    rng = np.random.default_rng(seed)
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        for _ in range(num_documents):
            length = int(rng.integers(20, 300))
            start, stride = int(rng.integers(0, vocab_size)), int(rng.integers(1, 5))
            writer.add_document((start + stride * np.arange(length)) % vocab_size)
        writer.finalize()
    return prefix


def main() -> None:
    parser = argparse.ArgumentParser(description="Write a synthetic token file for the *-debug.json argument files.")
    parser.add_argument("output_prefix", nargs="?", default="data/debug_pattern",
                        help="output path without suffix (default data/debug_pattern)")
    parser.add_argument("--num_documents", type=int, default=300, help="documents to write (default 300)")
    parser.add_argument("--vocab_size", type=int, default=DEBUG_VOCAB_SIZE,
                        help=f"ids stay below this (default {DEBUG_VOCAB_SIZE}, the tiny models' vocabulary)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace PREFIX.bin/.idx if they exist")
    args = parser.parse_args()
    prefix = args.output_prefix
    if not os.path.basename(prefix) or prefix.endswith((".bin", ".idx")) or os.path.isdir(prefix):
        parser.error(f"output prefix {prefix!r}: give a path without suffix that is not a directory, e.g. "
                     "data/debug_pattern for data/debug_pattern.bin and .idx")
    for path in (prefix + ".bin", prefix + ".idx"):
        if os.path.exists(path) and not args.overwrite:
            parser.error(f"{path} already exists; pass --overwrite to replace it, or choose another output prefix")
    if args.num_documents < 1:
        parser.error(f"--num_documents {args.num_documents}: give 1 or more")
    if not 5 <= args.vocab_size <= 65536:
        parser.error(f"--vocab_size {args.vocab_size}: give 5 to 65536 (the ids are stored as uint16)")
    directory = os.path.dirname(os.path.abspath(prefix))
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        parser.error(f"cannot create the directory of {prefix!r}: {e.strerror or e}")
    write_pattern_tokens(prefix, args.num_documents, args.vocab_size, args.seed)
    print(f"wrote {args.output_prefix}.bin and {args.output_prefix}.idx: {args.num_documents} documents, "
          f"token ids below {args.vocab_size}")


if __name__ == "__main__":
    main()
