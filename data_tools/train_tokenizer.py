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

from _common import run_tool


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input_path", required=True,
                        help="a .jsonl/.json/.txt file (optionally .gz or .zst) or a directory searched recursively")
    parser.add_argument("--json_key", nargs="+", default=["text"],
                        help="JSON key(s) holding the text; several keys and list values are joined with newlines")
    parser.add_argument("--output_prefix", required=True, help="output path without suffix; writes PREFIX.model and PREFIX.vocab")
    parser.add_argument("--vocab_size", type=int, default=32000, help="number of pieces, including the 3 special tokens and 256 bytes")
    parser.add_argument("--character_coverage", type=float, default=0.9995,
                        help="share of characters covered by pieces; rarer ones fall back to bytes (0.9995 suits CJK text)")
    parser.add_argument("--max_sentences", type=int, default=2_000_000,
                        help="lines sampled from the corpus for training; 0 uses every line")
    parser.add_argument("--max_sentence_length", type=int, default=16384, help="maximum line length in bytes; longer lines are skipped")
    parser.add_argument("--seed", type=int, default=1234, help="seed for sampling lines")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="trainer threads")
    parser.add_argument("--skip_invalid", action="store_true",
                        help="skip records with invalid UTF-8, invalid JSON or a missing key instead of failing")
    return parser.parse_args()


def main() -> None:
    import sentencepiece

    from fleetlm.data.corpus import iter_documents
    from fleetlm.data.errors import DataError

    args = parse_args()
    if args.vocab_size < 260:
        raise DataError(f"--vocab_size {args.vocab_size} is too small: 3 special tokens and 256 byte pieces need at least 260")
    output_dir = os.path.dirname(os.path.abspath(args.output_prefix))
    if not os.path.isdir(output_dir):
        raise DataError(f"output directory {output_dir!r} does not exist; create it or change --output_prefix")

    # SentencePiece trains on lines, so documents are cut at newlines; blank lines carry no pieces.
    lines = []
    documents = 0
    for text in iter_documents(args.input_path, args.json_key, skip_invalid=args.skip_invalid):
        documents += 1
        lines.extend(line for line in text.split("\n") if line.strip())
    if not lines:
        raise DataError(f"no text found under {args.input_path!r}; check --input_path and --json_key")

    start = time.perf_counter()
    sentencepiece.set_random_generator_seed(args.seed)
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_prefix=args.output_prefix,
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
    except RuntimeError as error:
        raise DataError(f"SentencePiece training failed: {error}") from None
    print(f"wrote {args.output_prefix}.model and {args.output_prefix}.vocab: documents {documents}, "
          f"lines {len(lines)}, vocab {args.vocab_size}, seconds {time.perf_counter() - start:.1f}")


if __name__ == "__main__":
    # SentencePiece trains in C++, where a Python signal handler would run only after training ends,
    # so SIGTERM keeps its default action and stops the run at once.
    run_tool(main, handle_stop_signals=False)
