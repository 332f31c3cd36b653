"""Load a tokenizer from a local file or directory behind one small interface.

Three file kinds are supported, and each is read with the library that defines it:

* a SentencePiece ``.model`` (LLaMA, Mistral and the tokenizers that ``data_tools/train_tokenizer.py``
  writes), read with ``sentencepiece``;
* a tiktoken ranks file (``gpt2.tiktoken``, ``qwen.tiktoken``), read with ``tiktoken``. A ranks file
  stores only the merges, so the pre-tokenizer pattern and the special tokens come from
  ``TIKTOKEN_SPECS`` below, keyed by the file name;
* a Hugging Face ``tokenizer.json`` (ChatGLM3 and most recent models), read with ``tokenizers``.
  The EOS and BOS tokens come from a ``tokenizer_config.json`` beside it when one exists.

A directory is searched for ``*.tiktoken``, ``tokenizer.json`` and ``tokenizer.model``, in that order.
"""

import binascii
import contextlib
import functools
import itertools
import json
import os
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

from fleetlm.models.registry import MODEL_REGISTRY, bundled_tokenizer_files
from fleetlm.utils.log import get_logger

logger = get_logger(__name__)

# Model names that ``load_tokenizer`` resolves to a tokenizer file, for the model registry to fill in.
# A name found here wins over a path of the same spelling.
TOKENIZER_FILES_BY_MODEL_NAME: dict[str, str] = bundled_tokenizer_files()

# tiktoken's r50k_base pattern (tiktoken_ext/openai_public.py, tiktoken 0.14), used by GPT-2.
_R50K_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# Qwen (v1) pre-tokenizer pattern, as Qwen's tokenization_qwen.py defines it.
_QWEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


@dataclass(frozen=True)
class TiktokenSpec:
    """Pre-tokenizer pattern, special tokens and their roles, which a tiktoken ranks file does not store."""

    pattern: str
    num_ranks: int
    special_tokens: dict[str, int]
    eos_token: Optional[str]
    bos_token: Optional[str] = None


def _qwen_special_tokens() -> dict[str, int]:
    # Qwen numbers its specials from the first id after the 151,643 ranks: three named tokens, then
    # <|extra_0|>..<|extra_204|>, for 151,851 ids in all.
    names = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(205)]
    return {name: 151643 + i for i, name in enumerate(names)}


TIKTOKEN_SPECS: dict[str, TiktokenSpec] = {
    "gpt2.tiktoken": TiktokenSpec(
        pattern=_R50K_PATTERN,
        num_ranks=50256,
        special_tokens={"<|endoftext|>": 50256},
        eos_token="<|endoftext|>",
        # GPT-2 uses <|endoftext|> as its BOS token too (Hugging Face GPT2Tokenizer defaults).
        bos_token="<|endoftext|>",
    ),
    "qwen.tiktoken": TiktokenSpec(
        pattern=_QWEN_PATTERN,
        num_ranks=151643,
        special_tokens=_qwen_special_tokens(),
        eos_token="<|endoftext|>",
    ),
}


class TokenizerError(ValueError):
    """A tokenizer path or file that cannot be loaded."""


@dataclass
class Tokenizer:
    """A loaded tokenizer: ``encode`` treats special-token text in the input as ordinary text."""

    name: str
    kind: str
    vocab_size: int
    eos_token_id: Optional[int]
    bos_token_id: Optional[int]
    path: str
    _encode: Callable[[str], list[int]] = field(repr=False)
    _decode: Callable[[Sequence[int]], str] = field(repr=False)
    _encode_array: Optional[Callable[[str], np.ndarray]] = field(default=None, repr=False)
    _encode_batch: Optional[Callable[[list[str]], list[list[int]]]] = field(default=None, repr=False)
    # (texts, dtype) -> (ids, lengths), for a backend with a faster route than either of the above.
    _encode_batch_flat: Optional[Callable] = field(default=None, repr=False)

    def encode(self, text: str) -> list[int]:
        """Return the token ids of ``text``, with no BOS or EOS added."""
        return self._encode(text)

    def encode_array(self, text: str) -> np.ndarray:
        """Return the same ids as ``encode`` as a 1-d integer array, skipping the Python list where the backend can."""
        if self._encode_array is not None:
            return self._encode_array(text)
        ids = self._encode(text)
        return np.fromiter(ids, dtype=np.int64, count=len(ids))

    def encode_batch_flat(self, texts: Sequence[str], dtype=np.int64) -> tuple[np.ndarray, np.ndarray]:
        """Encode ``texts`` on the calling thread and return all ids concatenated, and the id count of each text.

        The ids are those of ``encode`` on each text, stored as ``dtype`` (which must hold every id
        of the vocabulary) without an intermediate array. The backend's batch call is used where it
        has one, but never its thread pool, so that one process keeps to one core.
        """
        if self._encode_batch_flat is not None:
            return self._encode_batch_flat(texts, dtype)
        if self._encode_batch is None:
            arrays = [self.encode_array(text) for text in texts]
            lengths = np.fromiter(map(len, arrays), dtype=np.int64, count=len(arrays))
            if not arrays:
                return np.zeros(0, dtype=dtype), lengths
            # "unsafe" allows uint32 to int32 and to uint16; the caller's dtype can represent every id.
            return np.concatenate(arrays, dtype=dtype, casting="unsafe"), lengths
        id_lists = self._encode_batch(list(texts))
        lengths = np.fromiter(map(len, id_lists), dtype=np.int64, count=len(id_lists))
        ids = np.fromiter(itertools.chain.from_iterable(id_lists), dtype=dtype, count=int(lengths.sum()))
        return ids, lengths

    def decode(self, ids: Sequence[int]) -> str:
        """Return the text of ``ids``; special tokens are decoded as their text."""
        return self._decode([int(i) for i in ids])


def load_tokenizer(name_or_path: str) -> Tokenizer:
    """Load the tokenizer at a file or directory path, or one registered under a model name."""
    path = TOKENIZER_FILES_BY_MODEL_NAME.get(name_or_path, name_or_path)
    if not os.path.exists(path) and name_or_path in MODEL_REGISTRY:
        raise TokenizerError(
            f"tokenizer not found: {name_or_path!r} is a registered model name, but fleetlm bundles no tokenizer "
            f"for it; pass the path of that checkpoint's tokenizer file (tokenizer.model, tokenizer.json or *.tiktoken)"
        )
    if not os.path.exists(path):
        raise TokenizerError(
            f"tokenizer not found: {name_or_path!r} is neither an existing file or directory nor a registered "
            f"model name; pass the path of a tokenizer.model, tokenizer.json or *.tiktoken file"
        )
    if name_or_path in TOKENIZER_FILES_BY_MODEL_NAME:
        logger.warning(
            "%s is a registered model name; fleetlm uses its bundled stand-in tokenizer %s, whose ids may differ "
            "from that checkpoint's own tokenizer. Pass the checkpoint's tokenizer file for data it will train on.",
            name_or_path, path,
        )
    if os.path.isdir(path):
        path = _find_tokenizer_file(path)
    base = os.path.basename(path)
    if base.endswith(".tiktoken"):
        return _load_tiktoken(path)
    if base.endswith(".json"):
        return _load_hf_json(path)
    if base.endswith(".model"):
        return _load_sentencepiece(path)
    raise TokenizerError(
        f"unsupported tokenizer file {path!r}: expected a SentencePiece .model, a Hugging Face tokenizer.json "
        f"or a tiktoken ranks file ({', '.join(sorted(TIKTOKEN_SPECS))})"
    )


def _find_tokenizer_file(directory: str) -> str:
    names = sorted(os.listdir(directory))
    tiktoken_files = [n for n in names if n.endswith(".tiktoken")]
    if len(tiktoken_files) > 1:
        raise TokenizerError(
            f"tokenizer directory {directory!r} contains several tiktoken files {tiktoken_files}; "
            f"pass the path of the one to use"
        )
    for candidate in tiktoken_files + ["tokenizer.json", "tokenizer.model"]:
        if candidate in names:
            return os.path.join(directory, candidate)
    raise TokenizerError(
        f"no tokenizer file in directory {directory!r}: expected tokenizer.json, tokenizer.model or a *.tiktoken file"
    )


def _load_sentencepiece(path: str) -> Tokenizer:
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor()
    try:
        processor.Load(path)
    except (OSError, RuntimeError) as error:
        raise TokenizerError(f"cannot read SentencePiece model {path!r}: {error}") from None

    def optional_id(token_id: int) -> Optional[int]:
        # SentencePiece returns -1 for a special token the model was trained without.
        return token_id if token_id >= 0 else None

    return Tokenizer(
        name=_tokenizer_name(path),
        kind="sentencepiece",
        vocab_size=processor.GetPieceSize(),
        eos_token_id=optional_id(processor.eos_id()),
        bos_token_id=optional_id(processor.bos_id()),
        path=path,
        _encode=processor.EncodeAsIds,
        _decode=processor.DecodeIds,
        # One C++ call for the whole batch; num_threads=1 keeps it off SentencePiece's thread pool.
        _encode_batch=lambda texts: processor.Encode(texts, out_type=int, num_threads=1),
    )


def _read_tiktoken_ranks(path: str) -> dict[bytes, int]:
    # Each line is "<base64 token bytes> <rank>" (the format tiktoken.load.load_tiktoken_bpe reads).
    # It is parsed here so that loading a local file never touches tiktoken's download cache.
    with open(path, "rb") as handle:
        data = handle.read()
    fields = data.split()
    lines = data.count(b"\n") + (not data.endswith(b"\n"))
    if len(fields) == 2 * lines:
        # Two fields on every line: decode them all in C loops (twice as fast as a loop over lines).
        try:
            decode = functools.partial(binascii.a2b_base64, strict_mode=True)
            return dict(zip(map(decode, fields[0::2]), map(int, fields[1::2])))
        except (ValueError, binascii.Error):
            pass
    # Blank lines, or an error to locate.
    ranks: dict[bytes, int] = {}
    for line_number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[binascii.a2b_base64(token, strict_mode=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise TokenizerError(
                f"invalid tiktoken ranks file {path!r}, line {line_number}: expected '<base64 token> <rank>'"
            ) from None
    return ranks


def _load_tiktoken(path: str) -> Tokenizer:
    import tiktoken

    base = os.path.basename(path)
    spec = TIKTOKEN_SPECS.get(base)
    if spec is None:
        raise TokenizerError(
            f"unknown tiktoken file {path!r}: its pattern and special tokens are not known; "
            f"known files are {sorted(TIKTOKEN_SPECS)} (add a TiktokenSpec to fleetlm.tokenizer.TIKTOKEN_SPECS)"
        )
    ranks = _read_tiktoken_ranks(path)
    if len(ranks) != spec.num_ranks:
        raise TokenizerError(
            f"tiktoken file {path!r} has {len(ranks)} ranks, expected {spec.num_ranks} for {base}; "
            f"the file is truncated or is not the {base} the name says"
        )
    encoding = tiktoken.Encoding(
        name=base.removesuffix(".tiktoken"),
        pat_str=spec.pattern,
        mergeable_ranks=ranks,
        special_tokens=spec.special_tokens,
    )
    special = spec.special_tokens
    return Tokenizer(
        name=encoding.name,
        kind="tiktoken",
        vocab_size=max(list(ranks.values()) + list(special.values())) + 1,
        eos_token_id=special[spec.eos_token] if spec.eos_token else None,
        bos_token_id=special[spec.bos_token] if spec.bos_token else None,
        path=path,
        _encode=encoding.encode_ordinary,
        # Byte-level BPE can split a UTF-8 character across tokens; "replace" keeps decode total for
        # any id slice, and a whole document decodes exactly.
        _decode=lambda ids: encoding.decode(ids, errors="replace"),
        # Empty allowed and disallowed special sets encode special-token text as ordinary text, as
        # encode_ordinary does, and return a uint32 array straight from tiktoken's buffer.
        _encode_array=lambda text: encoding.encode_to_numpy(text, allowed_special=set(), disallowed_special=()),
        _encode_batch_flat=_tiktoken_batch_flat(encoding),
    )


def _tiktoken_batch_flat(encoding) -> Optional[Callable]:
    """Return a batch encoder that joins tiktoken's per-text id buffers and reads them as one array.

    encode_to_numpy makes one numpy array a text. On short texts that costs as much as the encoding
    itself: on the bundled Chinese poems (about 90 tokens each) joining the raw buffers was 13%
    faster for Qwen. The buffers come from CoreBPE.encode_to_tiktoken_buffer, the call behind
    encode_to_numpy, which is not public API; without it (another tiktoken version) this returns
    None and the per-text arrays are used.
    """
    encode_buffer = getattr(getattr(encoding, "_core_bpe", None), "encode_to_tiktoken_buffer", None)
    if encode_buffer is None:
        return None
    no_special: set = set()  # special-token text is encoded as ordinary text, as in encode_ordinary

    def encode_batch_flat(texts: Sequence[str], dtype) -> tuple[np.ndarray, np.ndarray]:
        buffers = [encode_buffer(text, no_special) for text in texts]
        # Each buffer contains native uint32 ids.
        lengths = np.fromiter((memoryview(buffer).nbytes // 4 for buffer in buffers), dtype=np.int64,
                              count=len(buffers))
        ids = np.frombuffer(b"".join(buffers), dtype=np.uint32)
        return ids.astype(dtype, casting="unsafe"), lengths

    return encode_batch_flat


def _load_hf_json(path: str) -> Tokenizer:
    import tokenizers

    try:
        backend = tokenizers.Tokenizer.from_file(path)
    except Exception as error:  # noqa: BLE001 - the Rust loader raises a bare Exception on any bad file
        raise TokenizerError(f"cannot read Hugging Face tokenizer {path!r}: {error}") from None

    # Special-token text in a document ("</s>" in web text) is encoded as ordinary text, as the
    # other backends do, so only --append_eos puts EOS ids into the data. Older releases lack the switch.
    if hasattr(backend, "encode_special_tokens"):
        backend.encode_special_tokens = True

    # Special tokens may be listed only in tokenizer_config.json (ChatGLM3 keeps [gMASK], sop and the
    # role tokens there), so the vocabulary size counts those ids too.
    config = _read_tokenizer_config(os.path.join(os.path.dirname(path), "tokenizer_config.json"))
    ids = list(backend.get_vocab(with_added_tokens=True).values())
    ids += [int(i) for i in config.get("added_tokens_decoder", {})]

    def token_id(role: str) -> Optional[int]:
        token = config.get(role)
        if isinstance(token, dict):
            token = token.get("content")
        if token is None:
            return None
        return backend.token_to_id(token)

    # encode_batch_fast returns the same ids without the character offsets, which are not stored here.
    # Skipping them saved about a quarter of the CPU time for ChatGLM3 (tokenizers 0.23.3).
    # Older releases lack it and fall back to encode_batch.
    encode_batch = getattr(backend, "encode_batch_fast", backend.encode_batch)

    def encode_batch_ids(texts: list[str]) -> list[list[int]]:
        with _tokenizers_parallelism_off():
            encodings = encode_batch(texts, add_special_tokens=False)
        return [encoding.ids for encoding in encodings]

    return Tokenizer(
        name=_tokenizer_name(path),
        kind="huggingface",
        vocab_size=max(ids) + 1,
        eos_token_id=token_id("eos_token"),
        bos_token_id=token_id("bos_token"),
        path=path,
        _encode=lambda text: backend.encode(text, add_special_tokens=False).ids,
        _decode=lambda ids: backend.decode(ids, skip_special_tokens=False),
        _encode_batch=encode_batch_ids,
    )


@contextlib.contextmanager
def _tokenizers_parallelism_off():
    # tokenizers reads TOKENIZERS_PARALLELISM at every batch call and, unless it is "false", spreads
    # the batch over a thread per core. The caller's value is restored afterwards.
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous


def _read_tokenizer_config(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TokenizerError(f"invalid tokenizer config {path!r}: {error}") from None


def _tokenizer_name(path: str) -> str:
    # "tests/assets/tokenizers/chatglm3/tokenizer.json" -> "chatglm3": generic file names take the
    # directory's name.
    stem = os.path.splitext(os.path.basename(path))[0]
    if stem in ("tokenizer", ""):
        return os.path.basename(os.path.dirname(os.path.abspath(path)))
    return stem
