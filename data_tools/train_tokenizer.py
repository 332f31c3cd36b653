"""Train a SentencePiece BPE tokenizer with byte fallback on a raw corpus, for pretraining from scratch.

Example:
    python data_tools/train_tokenizer.py --input_path examples/data/shakespeare \\
        --vocab_size 8000 --output_prefix data/shakespeare_bpe

Writes PREFIX.model (load it with --tokenizer_name_or_path PREFIX.model) and PREFIX.vocab. The ids
follow LLaMA's convention: <unk>=0, <s>=1, </s>=2, no padding token.
"""

import argparse
import os
import time

import _common  # noqa: F401 - puts the repository root on sys.path

from _common import check_json_keys, run_tool


# SentencePiece's own bounds (trainer_interface.cc), checked here so the message names the option.
MIN_SENTENCE_LENGTH, MAX_SENTENCE_LENGTH = 10, 1 << 30
MIN_CHARACTER_COVERAGE = 0.98
MAX_THREADS = 1024
# 3 special tokens (<unk>, <s>, </s>) and 256 byte-fallback pieces come before any learned piece.
MIN_VOCAB_SIZE = 260


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input_path", required=True,
                        help="a .jsonl/.json/.txt file (optionally .gz or .zst) or a directory searched recursively")
    parser.add_argument("--json_key", nargs="+", action="extend", default=None,
                        help="JSON key(s) holding the text (default: text); several keys, also from a repeated --json_key, and list values are joined with newlines")
    parser.add_argument("--output_prefix", required=True, help="output path without suffix; writes PREFIX.model and PREFIX.vocab")
    parser.add_argument("--overwrite", action="store_true", help="replace PREFIX.model and PREFIX.vocab if they exist")
    parser.add_argument("--vocab_size", type=int, default=32000,
                        help=f"number of pieces, including the 3 special tokens and 256 bytes (at least {MIN_VOCAB_SIZE})")
    parser.add_argument("--character_coverage", type=float, default=0.9995,
                        help=f"share of characters covered by pieces, {MIN_CHARACTER_COVERAGE} to 1; rarer ones fall back "
                             "to bytes (0.9995 suits CJK text)")
    parser.add_argument("--max_sentences", type=int, default=2_000_000,
                        help="lines sampled from the corpus for training; 0 uses every line")
    parser.add_argument("--max_sentence_length", type=int, default=16384,
                        help=f"maximum line length in bytes, {MIN_SENTENCE_LENGTH} or more; longer lines are skipped")
    parser.add_argument("--seed", type=int, default=1234, help="seed for sampling lines")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="trainer threads")
    parser.add_argument("--skip_invalid", action="store_true",
                        help="skip records with invalid UTF-8, invalid JSON or a missing key instead of failing")
    args = parser.parse_args()
    check_args(parser, args)
    return args


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit with status 2 for an option SentencePiece would reject, or an output that exists."""
    if args.vocab_size < MIN_VOCAB_SIZE:
        parser.error(f"--vocab_size {args.vocab_size} is too small: 3 special tokens and 256 byte pieces need at "
                     f"least {MIN_VOCAB_SIZE}")
    if not MIN_CHARACTER_COVERAGE <= args.character_coverage <= 1:
        parser.error(f"--character_coverage {args.character_coverage} is outside {MIN_CHARACTER_COVERAGE}..1; "
                     "use 1 for small alphabets, 0.9995 for CJK text")
    if not MIN_SENTENCE_LENGTH <= args.max_sentence_length <= MAX_SENTENCE_LENGTH:
        parser.error(f"--max_sentence_length {args.max_sentence_length} is outside {MIN_SENTENCE_LENGTH}.."
                     f"{MAX_SENTENCE_LENGTH} bytes")
    if args.max_sentences < 0:
        parser.error(f"--max_sentences {args.max_sentences} is negative; give a line count, or 0 for every line")
    if not 1 <= args.workers <= MAX_THREADS:
        parser.error(f"--workers {args.workers}: give 1 to {MAX_THREADS} threads")
    if not 0 <= args.seed < 1 << 32:
        parser.error(f"--seed {args.seed} is outside 0..{(1 << 32) - 1}")
    check_json_keys(parser, args)
    prefix = args.output_prefix
    if not os.path.basename(prefix) or prefix.endswith((".model", ".vocab")):
        parser.error(f"--output_prefix {prefix!r}: give a path without suffix, e.g. data/bpe for data/bpe.model "
                     "and data/bpe.vocab")
    for path in (prefix + ".model", prefix + ".vocab"):
        if os.path.isdir(path):
            parser.error(f"{path} is a directory; remove it or choose another --output_prefix")
        if os.path.exists(path) and not args.overwrite:
            parser.error(f"{path} already exists; pass --overwrite to replace it, or choose another --output_prefix")


def main() -> None:
    import sentencepiece

    from fleetlm.data.corpus import iter_documents
    from fleetlm.data.errors import DataError
    from fleetlm.data.indexed_dataset import remove_stale_temporary_files, temporary_name

    args = parse_args()
    output_dir = os.path.dirname(os.path.abspath(args.output_prefix))
    if not os.path.isdir(output_dir):
        raise DataError(f"output directory {output_dir!r} does not exist; create it or change --output_prefix")
    remove_stale_temporary_files(args.output_prefix)

    # SentencePiece trains on lines, so documents are cut at newlines; blank lines carry no pieces.
    lines = []
    documents = 0
    for text in iter_documents(args.input_path, args.json_key, skip_invalid=args.skip_invalid):
        documents += 1
        lines.extend(line for line in text.split("\n") if line.strip())
    if not lines:
        raise DataError(f"no text found under {args.input_path!r}; check --input_path and --json_key")
    if all(len(line.encode("utf-8")) > args.max_sentence_length for line in lines):
        raise DataError(f"every line is longer than --max_sentence_length {args.max_sentence_length} bytes, so "
                        "SentencePiece would skip them all; raise --max_sentence_length")

    # SentencePiece writes TMP.model and TMP.vocab under a hidden name. Both are renamed into place
    # only after training succeeds; a failed or interrupted run leaves an older model untouched.
    temporary = temporary_name(args.output_prefix, "tokenizer")
    start = time.perf_counter()
    sentencepiece.set_random_generator_seed(args.seed)
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_prefix=temporary,
            model_type="bpe",
            vocab_size=args.vocab_size,
            character_coverage=args.character_coverage,
            byte_fallback=True,
            # Identity normalization, kept spaces and no dummy prefix make decode(encode(text)) == text.
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            input_sentence_size=args.max_sentences,
            shuffle_input_sentence=True,
            max_sentence_length=args.max_sentence_length,
            num_threads=args.workers,
            minloglevel=2,
        )
        # The .vocab first: a reader needs only the .model, which then appears complete or not at all.
        os.replace(temporary + ".vocab", args.output_prefix + ".vocab")
        os.replace(temporary + ".model", args.output_prefix + ".model")
    except RuntimeError as error:
        raise DataError(f"SentencePiece training failed: {error}") from None
    finally:
        for suffix in (".model", ".vocab"):
            if os.path.exists(temporary + suffix):
                os.remove(temporary + suffix)
    print(f"wrote {args.output_prefix}.model and {args.output_prefix}.vocab: documents {documents}, "
          f"lines {len(lines)}, vocab {args.vocab_size}, seconds {time.perf_counter() - start:.1f}")


if __name__ == "__main__":
    # SentencePiece trains in C++, where a Python signal handler would run only after training ends,
    # so SIGTERM keeps its default action and stops the run at once; the next run of the same
    # prefix removes the temporary files it leaves.
    run_tool(main, handle_stop_signals=False)
