"""Tokenize a raw corpus into a ``.bin/.idx`` token file, in one process or several.

The main process only reads: it cuts the files into blocks of whole records and groups the
blocks into tasks of about ``TASK_BYTES``. Each task is decoded, parsed, tokenized and turned
into little-endian token bytes in one call, in a worker process or, with one worker, in the main
process itself. The main process writes the results in submission order, so the output is
byte-identical for any number of workers.
"""

import collections
import multiprocessing
import os
import time
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Optional, Sequence

import numpy as np
from tqdm import tqdm

from fleetlm.data.corpus import (
    InvalidRecordError,
    RecordBlock,
    extract_text,
    iter_record_blocks,
    list_input_files,
    plain_jsonl_texts,
)
from fleetlm.data.errors import DataError
from fleetlm.data.indexed_dataset import IndexedDatasetWriter, token_dtype_for_vocab
from fleetlm.tokenizer import Tokenizer, load_tokenizer
from fleetlm.utils.log import get_logger

logger = get_logger(__name__)

# Blocks are grouped into tasks of at least this many bytes (a .json block counts as a whole task).
# 1 MiB keeps the inter-process traffic to a few messages a second per worker, and the last task,
# which one worker finishes alone, short.
TASK_BYTES = 1 << 20


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


class TaskResult(NamedTuple):
    """The documents of one task, ready to append to the token file."""

    tokens: np.ndarray  # ids of every document written, in order, in the file's little-endian dtype
    sizes: np.ndarray  # int32 tokens per document written
    records: int  # records in the task, documents and skipped ones alike
    documents_read: int
    empty_skipped: int
    invalid_skipped: int
    error: Optional[str]  # message of the first invalid record, when invalid records are not skipped


class TaskEncoder:
    """Per-process state: the tokenizer and the settings that turn a task of records into token bytes."""

    def __init__(self, tokenizer: Tokenizer, json_keys: Sequence[str], append_eos: bool, skip_invalid: bool):
        self.tokenizer = tokenizer
        self.json_keys = list(json_keys)
        self.append_eos = append_eos
        self.skip_invalid = skip_invalid
        self.eos = tokenizer.eos_token_id if append_eos else None
        self.dtype = np.dtype(token_dtype_for_vocab(tokenizer.vocab_size)).newbyteorder("<")

    def encode_task(self, blocks: Sequence[RecordBlock]) -> TaskResult:
        """Parse and tokenize every record of ``blocks``; stop at the first invalid one unless skipping them."""
        texts: list[str] = []
        records = documents_read = empty_skipped = invalid_skipped = 0
        for block in blocks:
            plain = plain_jsonl_texts(block, self.json_keys) if block.kind == "jsonl" else None
            if plain is not None:
                records += len(plain)
                documents_read += len(plain)
                for text in plain:
                    if not text or text.isspace():
                        empty_skipped += 1
                    else:
                        texts.append(text)
                continue
            for record in block.records():
                records += 1
                if record.kind == "invalid":
                    # A .json file that could not be parsed: a skipped file, not a document read.
                    if not self.skip_invalid:
                        return self._failed(record.payload)
                    invalid_skipped += 1
                    continue
                documents_read += 1
                try:
                    text = extract_text(record, self.json_keys)
                except InvalidRecordError as error:
                    if not self.skip_invalid:
                        return self._failed(str(error))
                    invalid_skipped += 1
                    continue
                if not text or text.isspace():
                    empty_skipped += 1
                    continue
                texts.append(text)

        ids, sizes = self.tokenizer.encode_batch_flat(texts, self.dtype)
        if self.eos is not None:
            # Insert one EOS id at the end of each document: np.cumsum(sizes) are the end positions.
            ids = np.insert(ids, np.cumsum(sizes), self.eos)
            sizes = sizes + 1
        return TaskResult(
            tokens=ids,
            sizes=sizes.astype(np.int32),
            records=records,
            documents_read=documents_read,
            empty_skipped=empty_skipped,
            invalid_skipped=invalid_skipped,
            error=None,
        )

    @staticmethod
    def _failed(message: str) -> TaskResult:
        return TaskResult(np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.int32), 0, 0, 0, 0, message)


_worker_encoder: Optional[TaskEncoder] = None


def _init_worker(encoder: Optional[TaskEncoder], tokenizer_path: str, json_keys: Sequence[str], append_eos: bool,
                 skip_invalid: bool) -> None:
    # A forked worker inherits the parent's encoder, loaded tokenizer included. A spawned one gets
    # None, because a loaded tokenizer cannot be pickled, and loads the tokenizer again.
    global _worker_encoder
    if encoder is None:
        encoder = TaskEncoder(load_tokenizer(tokenizer_path), json_keys, append_eos, skip_invalid)
    _worker_encoder = encoder


def _encode_in_worker(blocks: list[RecordBlock]) -> TaskResult:
    return _worker_encoder.encode_task(blocks)


def _tasks(blocks: Iterator[RecordBlock]) -> Iterator[list[RecordBlock]]:
    task, size = [], 0
    for block in blocks:
        task.append(block)
        size += len(block.payload) if isinstance(block.payload, bytes) else TASK_BYTES
        if size >= TASK_BYTES:
            yield task
            task, size = [], 0
    if task:
        yield task


def _worker_start_method() -> str:
    # fork hands every worker the tokenizer that the parent already loaded, at no cost, where spawn
    # starts a fresh interpreter that imports fleetlm and loads the tokenizer again (Qwen's 151,643
    # ranks alone take about 0.2 s). The workers start no thread pool (Tokenizer.encode_batch_flat
    # keeps to the calling thread), so the threads that fork leaves behind are never needed.
    # NOTE: fork copies only the calling thread. A lock that another thread of the caller holds at
    # that moment, such as a tokenizer cache lock while that thread encodes, stays held in the workers.
    return "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"


def _ordered_results(tasks: Iterator[list[RecordBlock]], encoder: TaskEncoder, tokenizer_path: str,
                     workers: int) -> Iterator[TaskResult]:
    """Yield the result of each task, in order, keeping at most ``2 * workers`` tasks in flight."""
    if workers == 1:
        for task in tasks:
            yield encoder.encode_task(task)
        return
    method = _worker_start_method()
    initargs = (encoder if method == "fork" else None, tokenizer_path, encoder.json_keys, encoder.append_eos,
                encoder.skip_invalid)
    pool = multiprocessing.get_context(method).Pool(workers, initializer=_init_worker, initargs=initargs)
    finished = False
    try:
        pending = collections.deque()
        for task in tasks:
            pending.append(pool.apply_async(_encode_in_worker, (task,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
        finished = True
    finally:
        # close lets the workers exit on their own; terminate stops them after an error or an interrupt.
        if finished:
            pool.close()
        else:
            pool.terminate()
        pool.join()


def tokenize_corpus(
    input_path: str,
    tokenizer_path: str,
    output_prefix: str,
    json_keys: Sequence[str] = ("text",),
    append_eos: bool = False,
    workers: int = 1,
    skip_invalid: bool = False,
    log_interval: int = 10000,
    metadata: Optional[dict] = None,
) -> PreprocessStats:
    """Tokenize every document under ``input_path`` into ``output_prefix.bin/.idx``.

    With ``metadata``, ``output_prefix.meta.json`` is written too (see IndexedDatasetWriter).

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
    encoder = TaskEncoder(tokenizer, json_keys, append_eos, skip_invalid)
    logger.info("tokenizing %d files under %s with %s (vocab %d, %s tokens), %d workers",
                len(files), input_path, tokenizer.name, tokenizer.vocab_size, encoder.dtype.name, workers)

    stats = PreprocessStats()
    writer = IndexedDatasetWriter(output_prefix, encoder.dtype, metadata=metadata)
    with writer, tqdm(unit="docs", desc="tokenizing", disable=None) as progress:
        tasks = _tasks(iter_record_blocks(files, skip_invalid=skip_invalid))
        for result in _ordered_results(tasks, encoder, tokenizer_path, workers):
            if result.error is not None:
                raise InvalidRecordError(result.error)
            _add_result(writer, stats, result)
            progress.update(result.records)
            elapsed = max(time.perf_counter() - start, 1e-9)
            progress.set_postfix_str(f"{stats.tokens_written / elapsed:,.0f} tokens/s", refresh=False)
            # Without a terminal the bar is hidden, so progress goes to the log every log_interval documents.
            documents_before = stats.documents_read - result.documents_read
            crossed_interval = stats.documents_read // log_interval > documents_before // log_interval
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


def _add_result(writer: IndexedDatasetWriter, stats: PreprocessStats, result: TaskResult) -> None:
    num_documents = len(result.sizes)
    if num_documents:
        # Every document is one sequence, so the document index is 0, 1, ..., num_documents.
        document_index = np.arange(num_documents + 1, dtype=np.int64)
        writer.add_sequences(result.sizes, document_index, [result.tokens])
    stats.documents_read += result.documents_read
    stats.empty_skipped += result.empty_skipped
    stats.invalid_skipped += result.invalid_skipped
    stats.documents_written += num_documents
    stats.tokens_written += int(result.sizes.sum(dtype=np.int64))
