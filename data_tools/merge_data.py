"""Merge several .bin/.idx token files into one, documents in input order.

Example:
    python data_tools/merge_data.py --input data/part-0 data/part-1 --output_prefix data/merged
    python data_tools/merge_data.py --input data/parts/ --output_prefix data/merged

A directory input merges every prefix found in it, sorted by name (as PaddleNLP's merge.py does).
All inputs must share one token dtype, since the ids are copied as raw bytes, and each may be given
once. When every input has a PREFIX.meta.json (create_pretraining_data.py writes one), their
tokenizers must match and the output gets one too; otherwise a warning reports that the tokenizers
cannot be checked. An input whose sequences are not stored back to back is rewritten sequentially.
"""

import argparse
import os

import _common  # noqa: F401 - puts the repository root on sys.path

from _common import check_output_prefix, run_tool


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", nargs="+", required=True,
                        help="token-file prefixes, or one directory whose *.idx / *_idx.npz files are all merged")
    parser.add_argument("--output_prefix", "--output-prefix", dest="output_prefix", required=True,
                        help="output path without suffix; writes PREFIX.bin and PREFIX.idx")
    parser.add_argument("--data_impl", default="mmap", choices=["mmap"], help="output format; only mmap (.bin/.idx)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing PREFIX.bin/.idx/.meta.json (by default the run stops instead)")
    args = parser.parse_args()
    check_output_prefix(parser, args.output_prefix, args.overwrite, "data/merged")
    return args


def main() -> None:
    from fleetlm.data.errors import DataError
    from fleetlm.data.indexed_dataset import find_prefixes, merge_token_files

    args = parse_args()
    if len(args.input) == 1 and os.path.isdir(args.input[0]):
        # An earlier merge written into the same directory is not an input of this one.
        output = os.path.abspath(args.output_prefix)
        prefixes = [prefix for prefix in find_prefixes(args.input[0]) if os.path.abspath(prefix) != output]
        if not prefixes:
            raise DataError(f"no token files (*.idx or *_idx.npz) in directory {args.input[0]!r}")
    else:
        prefixes = args.input
    if os.path.abspath(args.output_prefix) in {os.path.abspath(prefix) for prefix in prefixes}:
        raise DataError(f"--output_prefix {args.output_prefix!r} is also an input; choose a new output prefix")
    writer = merge_token_files(prefixes, args.output_prefix, tool="data_tools/merge_data.py")
    print(f"wrote {args.output_prefix}.bin/.idx: inputs {len(prefixes)}, documents {writer.num_documents}, "
          f"tokens {writer.num_tokens}, dtype {writer.dtype}")


if __name__ == "__main__":
    run_tool(main)
