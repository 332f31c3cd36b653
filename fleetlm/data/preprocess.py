"""Tokenize a raw corpus into a ``.bin/.idx`` token file, in one process or several.

The main process reads records in file order and sends them in batches to the workers, which
decode, parse and tokenize them. Results are written back in submission order, so the output is
byte-identical for any number of workers.
"""

import collections
import multiprocessing
import os
import time
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np
from tqdm import tqdm

from fleetlm.data.corpus import InvalidRecordError, RawRecord, extract_text, iter_raw_records, list_input_files
from fleetlm.data.errors import DataError
from fleetlm.data.indexed_dataset import IndexedDatasetWriter, token_dtype_for_vocab
from fleetlm.tokenizer import Tokenizer, load_tokenizer
from fleetlm.utils.log import get_logger

logger = get_logger(__name__)

# A batch is cut at whichever limit comes first; batches amortize the inter-process overhead.
BATCH_RECORDS = 256
BATCH_BYTES = 1 << 20

# Result markers for records that produce no document.
_EMPTY = -1
_INVALID = -2


@dataclass
class PreprocessStats:
    """Counts of one preprocessing run."""

    documents_read: int = 0
    empty_skipped: int = 0
    invalid_skipped: int = 0
    documents_written: int = 0
    tokens_written: int = 0
    bytes_written: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        return (
            f"documents read {self.documents_read}, empty documents skipped {self.empty_skipped}, "
            f"invalid records skipped {self.invalid_skipped}, documents written {self.documents_written}, "
            f"tokens written {self.tokens_written}, bytes {self.bytes_written}, seconds {self.seconds:.2f}"
        )


class _Encoder:
    """Per-process state: the tokenizer and the settings that turn a record into token bytes."""

    def __init__(self, tokenizer: Tokenizer, json_keys: Sequence[str], append_eos: bool):
        self.tokenizer = tokenizer
        self.json_keys = list(json_keys)
        self.eos = tokenizer.eos_token_id if append_eos else None
        self.dtype = np.dtype(token_dtype_for_vocab(tokenizer.vocab_size)).newbyteorder("<")

    def encode_batch(self, records: list[RawRecord]) -> list[tuple[int, object]]:
        """Return ``(num_tokens, token bytes)`` per record, or ``(_EMPTY, None)`` / ``(_INVALID, message)``."""
        results = []
        for record in records:
            try:
                text = extract_text(record, self.json_keys)
            except InvalidRecordError as error:
                results.append((_INVALID, str(error)))
                continue
            if not text or text.isspace():
                results.append((_EMPTY, None))
                continue
            # The cast cannot overflow: the dtype was chosen to hold every id of the vocabulary.
            ids = self.tokenizer.encode_array(text).astype(self.dtype, copy=False)
            if self.eos is not None:
                ids = np.append(ids, np.array([self.eos], dtype=self.dtype))
            results.append((len(ids), ids.tobytes()))
        return results


_process_encoder: Optional[_Encoder] = None


def _init_worker(tokenizer_path: str, json_keys: Sequence[str], append_eos: bool) -> None:
    global _process_encoder
    _process_encoder = _Encoder(load_tokenizer(tokenizer_path), json_keys, append_eos)


def _encode_in_worker(records: list[RawRecord]) -> list[tuple[int, object]]:
    return _process_encoder.encode_batch(records)


def _batches(records: Iterator[RawRecord]) -> Iterator[list[RawRecord]]:
    batch, size = [], 0
    for record in records:
        batch.append(record)
        size += len(record.payload) if isinstance(record.payload, (bytes, str)) else 256
        if len(batch) >= BATCH_RECORDS or size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _ordered_results(batches: Iterator[list[RawRecord]], encoder: _Encoder, tokenizer_path: str, workers: int):
    """Yield each batch with its results, in order, keeping at most ``2 * workers`` batches in flight."""
    if workers == 1:
        for batch in batches:
            yield batch, encoder.encode_batch(batch)
        return
    # spawn, not fork: the parent may hold tokenizer thread pools and the tqdm monitor thread.
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_init_worker, initargs=(tokenizer_path, encoder.json_keys,
                                                                   encoder.eos is not None)) as pool:
        pending = collections.deque()
        for batch in batches:
            pending.append((batch, pool.apply_async(_encode_in_worker, (batch,))))
            if len(pending) >= 2 * workers:
                done_batch, result = pending.popleft()
                yield done_batch, result.get()
        while pending:
            done_batch, result = pending.popleft()
            yield done_batch, result.get()


def tokenize_corpus(
    input_path: str,
    tokenizer_path: str,
    output_prefix: str,
    json_keys: Sequence[str] = ("text",),
    append_eos: bool = False,
    workers: int = 1,
    skip_invalid: bool = False,
    log_interval: int = 10000,
) -> PreprocessStats:
    """Tokenize every document under ``input_path`` into ``output_prefix.bin/.idx``.

    Raises DataError for a missing or empty input, an invalid record (unless ``skip_invalid``),
    or ``append_eos`` with a tokenizer that has no EOS token. No output file exists after an error.
    """
    if workers < 1:
        raise DataError(f"--workers must be at least 1, got {workers}")
    if log_interval < 1:
        raise DataError(f"--log_interval must be at least 1, got {log_interval}")
    start = time.perf_counter()
    tokenizer = load_tokenizer(tokenizer_path)
    if append_eos and tokenizer.eos_token_id is None:
        raise DataError(
            f"--append_eos was given but tokenizer {tokenizer.name!r} ({tokenizer.path}) has no EOS token; "
            f"drop --append_eos or use a tokenizer that defines one"
        )
    files = list_input_files(input_path)
    if not files:
        raise DataError(f"no .jsonl, .json or .txt files under {input_path!r}; check --input_path")
    encoder = _Encoder(tokenizer, json_keys, append_eos)
    logger.info("tokenizing %d files under %s with %s (vocab %d, %s tokens), %d workers",
                len(files), input_path, tokenizer.name, tokenizer.vocab_size, encoder.dtype.name, workers)

    stats = PreprocessStats()
    writer = IndexedDatasetWriter(output_prefix, encoder.dtype)
    with writer, tqdm(unit="docs", desc="tokenizing", disable=None) as progress:
        records = iter_raw_records(files, skip_invalid=skip_invalid)
        for batch, results in _ordered_results(_batches(records), encoder, tokenizer_path, workers):
            for record, (num_tokens, payload) in zip(batch, results):
                _add_result(writer, stats, record, num_tokens, payload, skip_invalid)
            progress.update(len(batch))
            elapsed = max(time.perf_counter() - start, 1e-9)
            progress.set_postfix_str(f"{stats.tokens_written / elapsed:,.0f} tokens/s", refresh=False)
            # Without a terminal the bar is hidden, so progress goes to the log every log_interval documents.
            crossed_interval = stats.documents_read // log_interval > (stats.documents_read - len(batch)) // log_interval
            if progress.disable and crossed_interval:
                logger.info("%d documents, %d tokens, %.0f documents/s, %.0f tokens/s", stats.documents_read,
                            stats.tokens_written, stats.documents_read / elapsed, stats.tokens_written / elapsed)
        if stats.documents_written == 0:
            raise DataError(
                f"no documents to write: {stats.documents_read} records read under {input_path!r}, "
                f"{stats.empty_skipped} empty and {stats.invalid_skipped} invalid; check --input_path and --json_key"
            )
        writer.finalize()
    stats.bytes_written = os.path.getsize(output_prefix + ".bin") + os.path.getsize(output_prefix + ".idx")
    stats.seconds = time.perf_counter() - start
    return stats


def _add_result(writer: IndexedDatasetWriter, stats: PreprocessStats, record: RawRecord, num_tokens: int,
                payload: object, skip_invalid: bool) -> None:
    if record.kind == "invalid":
        stats.invalid_skipped += 1
        return
    stats.documents_read += 1
    if num_tokens == _INVALID:
        if not skip_invalid:
            raise InvalidRecordError(payload)
        stats.invalid_skipped += 1
    elif num_tokens == _EMPTY:
        stats.empty_skipped += 1
    else:
        writer.add_document_bytes(payload, num_tokens)
        stats.documents_written += 1
        stats.tokens_written += num_tokens
