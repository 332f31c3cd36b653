"""Tokenize a raw text corpus into a PREFIX.bin/PREFIX.idx token file for pretraining.

Example:
    python data_tools/create_pretraining_data.py \\
        --tokenizer_name_or_path tests/assets/tokenizers/gpt2 \\
        --input_path examples/data/shakespeare --output_prefix data/shakespeare_gpt2 \\
        --append_eos --workers 2

The argument names follow PaddleNLP's llm/tools/preprocess/create_pretraining_data.py, so existing
commands keep working; see docs/data.md for the formats.
"""

import argparse
import hashlib
import os

import _common  # noqa: F401 - puts the repository root on sys.path

from _common import check_json_keys, check_output_prefix, run_tool


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--tokenizer_name_or_path", "--model_name_or_path", "--model_name", dest="tokenizer", required=True,
        help="tokenizer file (tokenizer.model, tokenizer.json, *.tiktoken) or a directory holding one",
    )
    group = parser.add_argument_group("input and output")
    group.add_argument("--input_path", required=True,
                       help="a .jsonl/.json/.txt file (optionally .gz or .zst) or a directory searched recursively")
    group.add_argument("--output_prefix", required=True, help="output path without suffix; writes PREFIX.bin, PREFIX.idx and PREFIX.meta.json")
    group.add_argument("--json_key", nargs="+", action="extend", default=None,
                       help="JSON key(s) holding the text (default: text); several keys, also from a repeated --json_key, and list values are joined with newlines")
    group.add_argument("--data_format", default="JSON", choices=["JSON", "json", "jsonl", "text"],
                       help="accepted for PaddleNLP compatibility; the input kind comes from each file's suffix")
    group.add_argument("--data_impl", default="mmap", choices=["mmap"], help="output format; only mmap (.bin/.idx)")
    group = parser.add_argument_group("processing")
    group.add_argument("--append_eos", action="store_true", help="append the tokenizer's EOS id to every document")
    group.add_argument("--workers", type=int, default=1,
                       help="processes that parse and tokenize (1: the main process does it); the output does not "
                            "depend on it. Use one per free core")
    group.add_argument("--log_interval", type=int, default=10000,
                       help="documents between progress log lines when no terminal shows the progress bar")
    group.add_argument("--skip_invalid", action="store_true",
                       help="skip and count records with invalid UTF-8, invalid JSON or a missing key instead of failing")
    group.add_argument("--overwrite", action="store_true",
                       help="replace an existing PREFIX.bin/.idx/.meta.json (by default the run stops instead)")
    args = parser.parse_args()
    check_args(parser, args)
    return args


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject argument values argparse cannot check by type; parser.error exits with status 2."""
    if args.workers < 1:
        parser.error(f"--workers {args.workers}: must be at least 1")
    if args.log_interval < 1:
        parser.error(f"--log_interval {args.log_interval}: must be at least 1")
    cores = os.cpu_count() or 1
    if args.workers > 4 * cores:
        parser.error(f"--workers {args.workers} is more than 4 per CPU core ({cores} cores here, so at most "
                     f"{4 * cores}); one worker per core, --workers {cores}, is the fastest")
    check_json_keys(parser, args)
    check_output_prefix(parser, args.output_prefix, args.overwrite, "data/corpus")


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def output_metadata(args: argparse.Namespace) -> dict:
    """Return the PREFIX.meta.json fields that describe how the tokens were made.

    merge_data.py compares the tokenizer's sha256 and vocab_size between inputs; the writer adds
    the dtype and the document, sequence and token counts.
    """
    from fleetlm.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    return {
        "tool": "data_tools/create_pretraining_data.py",
        "tokenizer": {
            "name": tokenizer.name,
            "kind": tokenizer.kind,
            "name_or_path": args.tokenizer,
            "file": os.path.abspath(tokenizer.path),
            "sha256": file_sha256(tokenizer.path),
            "vocab_size": tokenizer.vocab_size,
            "eos_token_id": tokenizer.eos_token_id,
            "bos_token_id": tokenizer.bos_token_id,
        },
        "append_eos": args.append_eos,
        "json_keys": list(args.json_key),
    }


def main() -> None:
    from fleetlm.data.preprocess import tokenize_corpus

    args = parse_args()
    stats = tokenize_corpus(
        input_path=args.input_path,
        tokenizer_path=args.tokenizer,
        output_prefix=args.output_prefix,
        json_keys=args.json_key,
        append_eos=args.append_eos,
        workers=args.workers,
        skip_invalid=args.skip_invalid,
        log_interval=args.log_interval,
        metadata=output_metadata(args),
    )
    print(f"wrote {args.output_prefix}.bin/.idx: {stats.summary()}")


if __name__ == "__main__":
    run_tool(main)
