"""Tokenize a raw corpus into a ``.bin/.idx`` token file, in one process or several.

The main process only reads: it cuts the files into blocks of whole records and groups the
blocks into tasks of about ``TASK_BYTES``. Each task is decoded, parsed, tokenized and turned
into little-endian token bytes in one call, in a worker process or, with one worker, in the main
process itself. The main process writes the results in submission order, so the output is
byte-identical for any number of workers.
"""

import collections
import multiprocessing
import multiprocessing.connection
import os
import queue
import signal
import threading
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


def _worker_loop(connection, inherited: list, encoder: Optional[TaskEncoder], tokenizer_path: str,
                 json_keys: Sequence[str], append_eos: bool, skip_invalid: bool) -> None:
    """Encode the tasks that arrive on ``connection`` and send back each result, until None arrives."""
    # Ctrl-C reaches every process of the terminal's process group; the main process alone decides
    # to stop, and then ends the workers. SIGTERM ends a worker at once: it shares no lock with the
    # other processes, so its end cannot block them.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # Closing the main process's pipe ends that a forked worker inherits leaves the main process as
    # the only reader of each pipe, so when it dies a worker's send fails at once instead of waiting.
    for other in inherited:
        other.close()
    # A forked worker inherits the parent's encoder, loaded tokenizer included. A spawned one gets
    # None, because a loaded tokenizer cannot be pickled, and loads the tokenizer again.
    if encoder is None:
        encoder = TaskEncoder(load_tokenizer(tokenizer_path), json_keys, append_eos, skip_invalid)
    while True:
        try:
            task = connection.recv()
        except EOFError:  # the main process has ended
            return
        if task is None:
            return
        try:
            connection.send(encoder.encode_task(task))
        except OSError:  # the main process has ended
            return


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
    """Yield the result of each task, in order, with at most ``2 * workers`` tasks in flight.

    Each worker process has a pipe of its own and no lock is shared between processes, so a worker
    that dies shows as the end of its pipe and cannot block the others. A reader thread reads the
    input and gives each task to the worker with the fewest incomplete tasks; one sender thread a
    worker writes that worker's tasks to its pipe, so a busy worker holds up no other. This thread
    takes every result as soon as it arrives and yields them in task order. A worker completes its
    tasks in the order it received them, so its next result belongs to the oldest task sent to it.
    """
    if workers == 1:
        for task in tasks:
            yield encoder.encode_task(task)
        return
    method = _worker_start_method()
    context = multiprocessing.get_context(method)
    args = (encoder if method == "fork" else None, tokenizer_path, encoder.json_keys, encoder.append_eos,
            encoder.skip_invalid)
    processes, connections, threads = [], [], []
    assigned = [collections.deque() for _ in range(workers)]  # task numbers given to each worker and not yet completed
    outboxes = [queue.Queue() for _ in range(workers)]  # tasks for each sender thread; None ends the worker
    lock = threading.Lock()
    window = threading.Semaphore(2 * workers)
    stop = threading.Event()
    outcome: queue.Queue = queue.Queue()  # the reader's last word: the number of tasks, or the reading error
    finished = False

    def read_tasks() -> None:
        try:
            count = 0
            for count, task in enumerate(tasks, start=1):
                window.acquire()
                if stop.is_set():
                    return
                with lock:
                    number = min(range(workers), key=lambda worker: len(assigned[worker]))
                    assigned[number].append(count - 1)
                outboxes[number].put(task)
            outcome.put(count)
        except BaseException as error:  # noqa: B902 - the receiving thread raises it
            outcome.put(error)

    def send_tasks(number: int) -> None:
        while True:
            task = outboxes[number].get()
            if stop.is_set() and task is not None:
                return
            try:
                connections[number].send(task)
            except OSError:  # the worker has ended; the receiving thread reports it
                return
            if task is None:
                return

    try:
        for _ in range(workers):
            ours, theirs = context.Pipe()
            # A forked worker also gets the main process's end of its own pipe and of the earlier ones.
            inherited = [*connections, ours] if method == "fork" else []
            process = context.Process(target=_worker_loop, args=(theirs, inherited, *args), daemon=True)
            process.start()
            theirs.close()  # the worker's end stays open only in the worker, so its death reads as EOF here
            processes.append(process)
            connections.append(ours)
        threads = [threading.Thread(target=send_tasks, args=(number,), daemon=True) for number in range(workers)]
        threads.append(threading.Thread(target=read_tasks, daemon=True))
        for thread in threads:
            thread.start()
        results: dict[int, TaskResult] = {}
        total = None  # known once the reader has read the whole input
        next_number = 0
        while total is None or next_number < total:
            if next_number in results:
                window.release()
                yield results.pop(next_number)
                next_number += 1
                continue
            if total is None and not outcome.empty():
                total = outcome.get()
                if isinstance(total, BaseException):
                    raise total
                continue
            for connection in multiprocessing.connection.wait(connections, timeout=0.05):
                number = connections.index(connection)
                result = _receive(connection, processes[number])
                with lock:
                    results[assigned[number].popleft()] = result
        finished = True
    finally:
        stop.set()
        window.release()  # a reader waiting for room notices the stop
        for outbox in outboxes:
            outbox.put(None)  # after the last task: ends the worker, then its sender thread
        if not finished:
            # After an error or a stop signal the workers' current tasks are not needed. Their end
            # also ends a send of a sender thread to them.
            for process in processes:
                process.kill()
        for process in processes:
            process.join()
        for thread in threads:
            thread.join()
        for connection in connections:
            connection.close()
        # The reader may have stopped inside the input's generators: close them now rather than at exit.
        if hasattr(tasks, "close"):
            tasks.close()


def _receive(connection, process) -> TaskResult:
    try:
        return connection.recv()
    except (EOFError, ConnectionResetError):
        process.join(timeout=5)
        code = process.exitcode
        ending = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with status {code}"
        hint = " A kill by signal 9 is often the kernel's out-of-memory killer: use fewer --workers." if code == -9 else ""
        raise DataError(
            f"worker process {process.pid} {ending} while tokenizing, so its documents are missing; no output "
            f"files were written.{hint}"
        ) from None


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
