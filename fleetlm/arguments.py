"""Command-line and JSON arguments of ``run_pretrain.py``, with PaddleNLP's names.

``parse_arguments(argv)`` reads ``CONFIG.json [--key value ...]``: the JSON file first, then CLI
flags that override it, then defaults. Every key is checked here before any worker does real work:
unknown keys (with the nearest valid name), wrong types, and values outside their allowed set are
rejected with a ``ConfigError`` that names the key, the value and the fix. Checks that need the
world size or the model architecture live in ``fleetlm.validate``.

The fields are grouped as PaddleNLP groups them (model, data, training) so that a PaddleNLP JSON
argument file reads the same here. A few PaddleNLP keys control features that have no meaning in
fleetlm (data loader workers, report destinations). They are accepted, logged once and ignored,
and listed in ``IGNORED_KEYS`` with the reason.
"""

import dataclasses
import difflib
import json
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union


class ConfigError(ValueError):
    """An invalid argument: the message names the key, the value and the fix."""


# A command-line flag written without a value ("--do_eval"); only boolean options may do that.
_NO_VALUE = object()


def _help(text: str, **extra) -> Dict[str, Any]:
    return {"help": text, **extra}


@dataclass
class ModelArguments:
    """Model arguments: the architecture, its weights and tokenizer, and kernel switches."""

    model_name_or_path: str = field(
        default="fleetlm/tiny-llama",
        metadata=_help("Registered model name (see fleetlm.models.registry) or a directory with config.json."),
    )
    tokenizer_name_or_path: Optional[str] = field(
        default=None,
        metadata=_help("Tokenizer file or directory; only used to check the vocabulary size against the model."),
    )
    continue_training: bool = field(
        default=False,
        metadata=_help("Start from the weights in model_name_or_path instead of a random initialisation."),
    )
    use_flash_attention: bool = field(
        default=False, metadata=_help("Use Paddle's fused flash-attention kernel where the device has it.")
    )
    use_fused_rms_norm: bool = field(
        default=False, metadata=_help("Use Paddle's fused RMSNorm kernel where the device has it.")
    )
    use_fused_rope: bool = field(
        default=False, metadata=_help("Use Paddle's fused rotary-embedding kernel where the device has it.")
    )
    use_fused_swiglu: bool = field(
        default=False, metadata=_help("Use Paddle's fused SwiGLU kernel (silu(gate) * up) where the device has it.")
    )
    virtual_pp_degree: int = field(default=1, metadata=_help("Virtual pipeline stages per pipeline rank."))
    # Architecture overrides: None keeps the value of the named model.
    vocab_size: Optional[int] = field(default=None, metadata=_help("Override: vocabulary size (number of ids)."))
    hidden_size: Optional[int] = field(default=None, metadata=_help("Override: model width."))
    intermediate_size: Optional[int] = field(default=None, metadata=_help("Override: MLP inner width."))
    num_hidden_layers: Optional[int] = field(default=None, metadata=_help("Override: number of decoder blocks."))
    num_attention_heads: Optional[int] = field(default=None, metadata=_help("Override: query heads."))
    num_key_value_heads: Optional[int] = field(
        default=None, metadata=_help("Override: key/value heads (grouped-query attention when fewer than heads).")
    )
    max_position_embeddings: Optional[int] = field(
        default=None, metadata=_help("Override: longest sequence the position encoding is built for, in tokens.")
    )
    rms_norm_eps: Optional[float] = field(
        default=None, metadata=_help("Override: epsilon of every norm layer (RMSNorm or LayerNorm, by family).")
    )
    rope_theta: Optional[float] = field(default=None, metadata=_help("Override: rotary embedding base."))
    tie_word_embeddings: Optional[bool] = field(
        default=None, metadata=_help("Override: share the input embedding with the output layer.")
    )
    initializer_range: Optional[float] = field(
        default=None, metadata=_help("Override: standard deviation of the normal weight initialisation.")
    )
    hidden_dropout_prob: float = field(default=0.0, metadata=_help("Dropout after attention and MLP outputs."))
    attention_probs_dropout_prob: float = field(default=0.0, metadata=_help("Dropout on attention weights."))


MODEL_OVERRIDE_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_theta",
    "tie_word_embeddings",
    "initializer_range",
)


@dataclass
class DataArguments:
    """Data arguments: the token files and how they become samples."""

    input_dir: str = field(
        default="./data",
        metadata=_help(
            "Token data: a PREFIX of PREFIX.bin/.idx, a directory of such pairs, or 'w1 PREFIX1 w2 PREFIX2 ...' "
            "to blend sources by weight."
        ),
    )
    split: str = field(
        default="949,50,1", metadata=_help("Train,valid,test proportions of the documents, e.g. '949,50,1' or '98,2'.")
    )
    max_seq_length: int = field(default=1024, metadata=_help("Tokens per training sample."))
    data_cache: Optional[str] = field(
        default=None, metadata=_help("Directory for the sample-index cache; default: index-cache/ next to the data.")
    )
    data_impl: str = field(
        default="mmap", metadata=_help("Token file format; only 'mmap' (PREFIX.bin/.idx or PREFIX_ids.npy) exists.")
    )
    share_folder: bool = field(
        default=False,
        metadata=_help("The index cache directory is shared by all nodes: only global rank 0 builds it."),
    )


@dataclass
class TrainingArguments:
    """Training arguments: optimisation, schedule, parallel layout, precision, logging and checkpoints."""

    output_dir: str = field(default="./output", metadata=_help("Directory for checkpoints and the metrics log."))
    do_train: bool = field(default=True, metadata=_help("Run the training loop."))
    do_eval: bool = field(default=False, metadata=_help("Evaluate on the valid split every eval_steps and at the end."))
    do_predict: bool = field(default=False, metadata=_help("Evaluate on the test split at the end."))
    per_device_train_batch_size: int = field(default=1, metadata=_help("Samples per micro-batch on each card."))
    per_device_eval_batch_size: int = field(default=1, metadata=_help("Samples per eval batch on each card."))
    gradient_accumulation_steps: int = field(default=1, metadata=_help("Micro-batches per optimizer step."))
    global_batch_size: int = field(
        default=0,
        metadata=_help(
            "Samples per optimizer step over all cards; when set, gradient_accumulation_steps is derived from it. "
            "0 means per_device_train_batch_size * gradient_accumulation_steps * data-parallel degree."
        ),
    )
    learning_rate: float = field(default=3e-4, metadata=_help("Peak learning rate, reached after warmup."))
    min_learning_rate: float = field(default=0.0, metadata=_help("Learning rate at the end of the decay."))
    warmup_steps: int = field(default=0, metadata=_help("Optimizer steps of linear warmup; wins over warmup_ratio."))
    warmup_ratio: float = field(default=0.0, metadata=_help("Warmup as a fraction of max_steps, when warmup_steps is 0."))
    lr_scheduler_type: str = field(
        default="cosine", metadata=_help("Decay after warmup: 'cosine', 'linear' or 'constant'.")
    )
    decay_steps: int = field(
        default=0, metadata=_help("Step at which the decay reaches min_learning_rate; 0 means max_steps.")
    )
    weight_decay: float = field(default=0.0, metadata=_help("AdamW decoupled weight decay (not applied to norms and biases)."))
    adam_beta1: float = field(default=0.9, metadata=_help("AdamW beta1."))
    adam_beta2: float = field(default=0.999, metadata=_help("AdamW beta2."))
    adam_epsilon: float = field(default=1e-8, metadata=_help("AdamW epsilon."))
    max_grad_norm: float = field(default=1.0, metadata=_help("Clip gradients to this global L2 norm; 0 disables clipping."))
    max_steps: int = field(default=1000, metadata=_help("Optimizer steps to train for."))
    logging_steps: int = field(default=10, metadata=_help("Optimizer steps between metrics lines."))
    eval_steps: int = field(default=100, metadata=_help("Optimizer steps between evaluations (with do_eval)."))
    eval_iters: int = field(default=10, metadata=_help("Batches per evaluation; the same batches every time."))
    save_steps: int = field(default=500, metadata=_help("Optimizer steps between checkpoints; 0 disables saving."))
    save_total_limit: int = field(
        default=0, metadata=_help("Keep at most this many complete checkpoints (newest); 0 keeps all.")
    )
    resume_from_checkpoint: Optional[str] = field(
        default=None,
        metadata=_help("'true' resumes from the newest complete checkpoint in output_dir; a path resumes from it."),
    )
    seed: int = field(default=42, metadata=_help("Seed for weights initialisation and data order."))
    bf16: bool = field(default=False, metadata=_help("bfloat16 mixed precision (GPU only; CPU builds stay fp32)."))
    fp16: bool = field(default=False, metadata=_help("float16 mixed precision with loss scaling (GPU only)."))
    fp16_opt_level: str = field(
        default="O1", metadata=_help("Mixed precision level: 'O1' (casts per op) or 'O2' (low-precision weights).")
    )
    disable_tqdm: bool = field(default=False, metadata=_help("Turn the progress bar off."))
    tensor_parallel_degree: int = field(default=1, metadata=_help("Tensor-parallel ranks per model replica."))
    pipeline_parallel_degree: int = field(default=1, metadata=_help("Pipeline stages."))
    sharding: str = field(
        default="", metadata=_help("Optimizer/gradient/parameter sharding: '', 'stage1', 'stage2' or 'stage3'.")
    )
    sharding_parallel_degree: int = field(
        default=-1, metadata=_help("Ranks that share one sharded copy; -1 means all data-parallel ranks.")
    )
    sequence_parallel: bool = field(
        default=False, metadata=_help("Split activations along the sequence between tensor-parallel ranks.")
    )
    recompute: bool = field(default=False, metadata=_help("Recompute activations in the backward pass to save memory."))
    recompute_granularity: str = field(
        default="full", metadata=_help("What recompute covers: 'full' (whole block), 'full_attn' or 'core_attn'.")
    )
    no_recompute_layers: Optional[List[int]] = field(
        default=None, metadata=_help("Indices of blocks excluded from recompute.")
    )
    pipeline_parallel_config: str = field(default="", metadata=_help("Pipeline options, space separated."))
    tensor_parallel_config: str = field(default="", metadata=_help("Tensor-parallel options, space separated."))
    sharding_parallel_config: str = field(default="", metadata=_help("Sharding options, space separated."))
    peak_tflops: float = field(
        default=0.0,
        metadata=_help(
            "Peak TFLOPS per card for MFU. 0: the device's datasheet figure on known GPUs; on CPU, a matmul "
            "rate measured at start-up."
        ),
    )


ARGUMENT_GROUPS = (ModelArguments, DataArguments, TrainingArguments)

# PaddleNLP keys that fleetlm accepts for compatibility but does not act on, with the reason.
IGNORED_KEYS = {
    "dataloader_num_workers": "samples are read from a memory map in the training process",
    "distributed_dataloader": "every rank reads its own samples from the memory map",
    "report_to": "metrics go to the log and to output_dir/metrics.jsonl",
    "logging_dir": "metrics go to output_dir/metrics.jsonl",
    "overwrite_output_dir": "existing checkpoints are kept; use resume_from_checkpoint to continue",
    "skip_memory_metrics": "peak memory is always in the metrics line",
    "unified_checkpoint": "fleetlm has one checkpoint layout",
    "skip_warmup": "the memory map needs no warm-up read",
    "save_strategy": "checkpoints follow save_steps",
    "evaluation_strategy": "evaluation follows eval_steps and do_eval",
    "fuse_attention_qkv": "projections follow the checkpoint's layout",
    "fuse_attention_ffn": "projections follow the checkpoint's layout",
    "enable_linear_fused_grad_add": "a GPU-only kernel option with no effect on results",
    "amp_master_grad": "O2 keeps fp32 master weights and gradients",
    "scale_loss": "the initial loss scale is Paddle's default",
    "recompute_use_reentrant": "recompute uses Paddle's default",
    "device": "the device comes from the Paddle build and the launcher",
    "skip_profile_timer": "there is no profiler timer",
    "use_fast_layer_norm": "the norm kernel is chosen by use_fused_rms_norm and the device",
    "tensor_parallel_output": "under tensor parallelism the loss is always computed on the vocabulary-split logits",
    "eval_accumulation_steps": "evaluation keeps only the mean loss, so there are no predictions to accumulate",
}


def _all_fields() -> Dict[str, Tuple[type, dataclasses.Field]]:
    fields = {}
    for group in ARGUMENT_GROUPS:
        for f in dataclasses.fields(group):
            fields[f.name] = (group, f)
    return fields


def _base_type(annotation) -> Tuple[type, bool]:
    """Return (scalar type, optional) for a field annotation such as Optional[int] or List[int]."""
    origin = typing.get_origin(annotation)
    if origin is Union:
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        base, _ = _base_type(inner[0])
        return base, True
    if origin in (list, List):
        return list, False
    return annotation, False


def _coerce(key: str, value: Any, annotation, from_cli: bool) -> Any:
    """Convert a JSON value or a CLI string to the field's type, or raise ConfigError."""
    base, optional = _base_type(annotation)
    if value is _NO_VALUE and key != "resume_from_checkpoint":
        if base is bool:
            return True
        raise ConfigError(f"--{key} needs a value ({base.__name__}); write --{key} VALUE.")
    shown = repr(value)
    if value is None or (from_cli and optional and str(value).lower() in ("none", "null")):
        if optional:
            return None
        raise ConfigError(f"{key}={shown}: a value is required here ({base.__name__}).")

    if key == "resume_from_checkpoint":
        # PaddleNLP accepts true/false as well as a path; a bare flag means true.
        if value is True or value is _NO_VALUE:
            return "true"
        if isinstance(value, bool):
            return "true" if value else None
        text = str(value)
        return None if text.lower() in ("false", "0", "") else text

    if base is bool:
        if isinstance(value, bool):
            return value
        # PaddleNLP's JSON files write switches as 0/1 ("sequence_parallel": 0).
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if from_cli and str(value).lower() in ("true", "1", "yes"):
            return True
        if from_cli and str(value).lower() in ("false", "0", "no"):
            return False
        raise ConfigError(f"{key}={shown}: expected true or false (or 1/0).")

    if base is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={shown}: expected an integer, got a boolean.")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if from_cli:
            try:
                return int(str(value))
            except ValueError:
                pass
        raise ConfigError(f"{key}={shown}: expected an integer.")

    if base is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={shown}: expected a number, got a boolean.")
        number = None
        if isinstance(value, (int, float)):
            number = float(value)
        elif from_cli:
            try:
                number = float(str(value))
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{key}={shown}: expected a number.")
        if not math.isfinite(number):
            raise ConfigError(f"{key}={shown}: expected a finite number.")
        return number

    if base is list:
        if from_cli and isinstance(value, str):
            try:
                return [int(v) for v in value.replace(",", " ").split()]
            except ValueError:
                raise ConfigError(f"{key}={shown}: expected integers separated by spaces or commas.") from None
        if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return list(value)
        raise ConfigError(f"{key}={shown}: expected a list of integers.")

    if base is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}={shown}: expected a string.")
    raise AssertionError(f"unhandled field type {annotation} for {key}")


def _unknown_key_error(key: str, source: str) -> ConfigError:
    valid = sorted(_all_fields()) + sorted(IGNORED_KEYS)
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    hint = f" Did you mean '{close[0]}'?" if close else " Run with --help for the list of options."
    if key == "dry_run":
        hint = " dry_run is a command-line switch only: write --dry_run after the argument file."
    return ConfigError(f"Unknown argument '{key}' in {source}.{hint}")


def _reject_duplicates(pairs, path: str) -> Dict[str, Any]:
    seen: Dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ConfigError(f"Argument file {path} sets '{key}' twice ({seen[key]!r} and {value!r}); keep one.")
        seen[key] = value
    return seen


def _directory_error(directory: str, count: int = 3) -> ConfigError:
    """Reject a directory given as the argument file, naming up to ``count`` JSON files in it (debug files first)."""
    try:
        names = sorted(n for n in os.listdir(directory) if n.endswith(".json"))
    except OSError:
        names = []
    if not names:
        return ConfigError(f"Argument file {directory} is a directory, not a JSON file; pass the path of a JSON argument file.")
    folder = os.path.basename(os.path.normpath(directory)).lower()
    names.sort(key=lambda n: ("debug" not in n, folder not in n.lower()))
    examples = ", ".join(os.path.join(directory, n) for n in names[:count])
    more = f"; {len(names)} files in all" if len(names) > count else ""
    return ConfigError(
        f"Argument file {directory} is a directory, not a JSON file; pass one of the JSON files in it, "
        f"such as {examples}{more}."
    )


def _read_json(path: str) -> Dict[str, Any]:
    if os.path.isdir(path):
        raise _directory_error(path)
    try:
        # utf-8-sig also reads files that an editor saved with a byte order mark.
        with open(path, encoding="utf-8-sig") as f:
            data = json.load(f, object_pairs_hook=lambda pairs: _reject_duplicates(pairs, path))
    except FileNotFoundError:
        raise ConfigError(f"Argument file not found: {path}") from None
    except PermissionError:
        raise ConfigError(
            f"Argument file {path} cannot be read: permission denied. Make it readable (chmod u+r) or pass another file."
        ) from None
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"Argument file {path} is not UTF-8 text (invalid byte at offset {e.start}); save it as UTF-8 JSON."
        ) from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"Argument file {path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}.") from None
    except OSError as e:
        raise ConfigError(f"Argument file {path} cannot be read: {e.strerror or e}.") from None
    if not isinstance(data, dict):
        raise ConfigError(f"Argument file {path} must hold one JSON object of key/value pairs, got {type(data).__name__}.")
    return data


def _split_cli(argv: List[str], repeated: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """Turn ['--key', 'value', '--flag', ...] into a dict; a flag with no value means 'true'.

    A flag given more than once keeps its last value, as with argparse: a wrapper script can append
    an override. ``repeated`` (when given) receives a note for each such flag.
    """
    values: Dict[str, str] = {}
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--"):
            hint = " The JSON argument file must come first, before any --key value." if token.endswith(".json") else ""
            raise ConfigError(f"Unexpected command-line value '{token}': options are written '--key value'.{hint}")
        key = token[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value = argv[i + 1]
            i += 2
        else:
            value = _NO_VALUE
            i += 1
        key = key.replace("-", "_")
        if key in values and repeated is not None:
            repeated[f"--{key}"] = (f"--{key} is given more than once on the command line ({_format_cli_value(values[key])}, "
                                    f"then {_format_cli_value(value)}); the last one is used")
        values[key] = value
    return values


def _format_cli_value(value: Any) -> str:
    return "no value" if value is _NO_VALUE else repr(value)


@dataclass
class Arguments:
    """The parsed model, data and training arguments, plus the keys that were ignored or overridden."""

    model: ModelArguments
    data: DataArguments
    training: TrainingArguments
    ignored: Dict[str, Any]
    config_file: Optional[str] = None
    # Argument-file values that a command-line flag replaced indirectly, each with the line to log.
    overridden: Dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        """Return every resolved argument as one flat dict (what a checkpoint records)."""
        out: Dict[str, Any] = {}
        for group in (self.model, self.data, self.training):
            out.update(dataclasses.asdict(group))
        return out


# global_batch_size and gradient_accumulation_steps both set the batch of an optimizer step. When
# the command line gives one and the argument file the other, the file's key goes back to this
# default so that the command line wins (a file cannot be edited from the command line).
_BATCH_KEY_DEFAULTS = {"global_batch_size": 0, "gradient_accumulation_steps": 1}


def _drop_file_batch_key(values: Dict[str, Any], cli_keys, file_keys, config_file: Optional[str]) -> Dict[str, str]:
    """Reset the file's batch key that a command-line batch key replaces; return {key: line to log}."""
    overridden = {}
    for cli_key, file_key in (("global_batch_size", "gradient_accumulation_steps"),
                              ("gradient_accumulation_steps", "global_batch_size")):
        if cli_key not in cli_keys or file_key not in file_keys or file_key in cli_keys:
            continue
        if cli_key == "global_batch_size" and values[cli_key] == 0:
            continue  # --global_batch_size 0 derives nothing, so the file's accumulation stays.
        default = _BATCH_KEY_DEFAULTS[file_key]
        if values[file_key] != default:
            overridden[file_key] = (
                f"dropping {file_key}={values[file_key]} from {config_file}: --{cli_key} {values[cli_key]} on the "
                f"command line sets the batch instead"
                + (" (gradient_accumulation_steps is derived from it)" if file_key == "gradient_accumulation_steps"
                   else " (global_batch_size is unset)")
            )
        values[file_key] = default
    return overridden


def parse_arguments(argv: List[str]) -> Arguments:
    """Parse ``[CONFIG.json] [--key value ...]``; later sources override earlier ones.

    A command-line global_batch_size or gradient_accumulation_steps also replaces the other of the
    two when the argument file sets it; ``Arguments.overridden`` records what was dropped.
    """
    config_file = None
    if argv and not argv[0].startswith("--"):
        config_file = argv[0]
        argv = argv[1:]

    fields = _all_fields()
    values: Dict[str, Any] = {}
    ignored: Dict[str, Any] = {}
    sources = []
    if config_file is not None:
        sources.append((_read_json(config_file), config_file, False))
    repeated: Dict[str, str] = {}
    sources.append((_split_cli(argv, repeated), "the command line", True))

    keys_by_source = []
    for raw, source, from_cli in sources:
        for key, value in raw.items():
            if key in IGNORED_KEYS:
                ignored[key] = value
                continue
            if key not in fields:
                raise _unknown_key_error(key, source)
            _, f = fields[key]
            values[key] = _coerce(key, value, f.type, from_cli)
        keys_by_source.append(set(raw))
    file_keys = keys_by_source[0] if config_file is not None else set()
    overridden = dict(repeated, **_drop_file_batch_key(values, keys_by_source[-1], file_keys, config_file))

    groups = []
    for group in ARGUMENT_GROUPS:
        names = {f.name for f in dataclasses.fields(group)}
        groups.append(group(**{k: v for k, v in values.items() if k in names}))
    args = Arguments(*groups, ignored=ignored, config_file=config_file, overridden=overridden)
    check_choices(args)
    return args


def check_choices(args: Arguments) -> None:
    """Reject values outside their allowed set or range (checks that need no world size or model)."""
    t, d, m = args.training, args.data, args.model
    choices = {
        "lr_scheduler_type": (t.lr_scheduler_type, ("cosine", "linear", "constant")),
        "sharding": (t.sharding, ("", "stage1", "stage2", "stage3")),
        "recompute_granularity": (t.recompute_granularity, ("full", "full_attn", "core_attn")),
        "fp16_opt_level": (t.fp16_opt_level, ("O1", "O2")),
        "data_impl": (d.data_impl, ("mmap",)),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key}='{value}' is not one of {', '.join(repr(a) for a in allowed)}.")

    positive = {
        "per_device_train_batch_size": t.per_device_train_batch_size,
        "per_device_eval_batch_size": t.per_device_eval_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "max_steps": t.max_steps,
        "logging_steps": t.logging_steps,
        "eval_steps": t.eval_steps,
        "eval_iters": t.eval_iters,
        "max_seq_length": d.max_seq_length,
        "tensor_parallel_degree": t.tensor_parallel_degree,
        "pipeline_parallel_degree": t.pipeline_parallel_degree,
        "virtual_pp_degree": m.virtual_pp_degree,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key}={value}: must be at least 1.")
    non_negative = {
        "learning_rate": t.learning_rate,
        "min_learning_rate": t.min_learning_rate,
        "warmup_steps": t.warmup_steps,
        "decay_steps": t.decay_steps,
        "weight_decay": t.weight_decay,
        "max_grad_norm": t.max_grad_norm,
        "save_steps": t.save_steps,
        "save_total_limit": t.save_total_limit,
        "global_batch_size": t.global_batch_size,
        "peak_tflops": t.peak_tflops,
    }
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"{key}={value}: must not be negative.")
    if not 0 <= t.seed < 2**32:
        raise ConfigError(f"seed={t.seed}: must be in [0, 2**32).")
    if t.adam_epsilon <= 0:
        raise ConfigError(f"adam_epsilon={t.adam_epsilon}: must be positive.")
    if not 0.0 <= t.warmup_ratio < 1.0:
        raise ConfigError(f"warmup_ratio={t.warmup_ratio}: must be in [0, 1).")
    if t.min_learning_rate > t.learning_rate:
        raise ConfigError(
            f"min_learning_rate={t.min_learning_rate} is above learning_rate={t.learning_rate}; "
            "lower min_learning_rate."
        )
    for key, value in (("adam_beta1", t.adam_beta1), ("adam_beta2", t.adam_beta2)):
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{key}={value}: must be in [0, 1).")
    for key, value in (
        ("hidden_dropout_prob", m.hidden_dropout_prob),
        ("attention_probs_dropout_prob", m.attention_probs_dropout_prob),
    ):
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{key}={value}: must be in [0, 1).")
    if t.bf16 and t.fp16:
        raise ConfigError("bf16 and fp16 are both true; choose one mixed-precision type.")
    if t.sharding_parallel_degree == 0 or t.sharding_parallel_degree < -1:
        raise ConfigError(
            f"sharding_parallel_degree={t.sharding_parallel_degree}: use -1 (all data-parallel ranks) or a positive degree."
        )


def format_help() -> str:
    """Return the --help text: every option with its type, default and meaning, grouped."""
    lines = [
        "usage: run_pretrain.py [CONFIG.json] [--key value ...] [--dry_run]",
        "",
        "Pretrain a language model. Options come from the JSON argument file, then from the command line",
        "(which overrides the file), then from the defaults below. An option given twice on the command",
        "line takes its last value, and the run logs it. A --global_batch_size or",
        "--gradient_accumulation_steps on the command line also replaces the other of the two when the",
        "argument file sets it.",
        "",
        "  --dry_run (switch; also --dry_run true or false)",
        "      Parse the arguments, check the parallel layout and split, print the parameter count and the",
        "      per-card memory of parameters, gradients and optimizer state, and exit without reading data.",
    ]
    for group in ARGUMENT_GROUPS:
        lines += ["", group.__doc__]
        for f in dataclasses.fields(group):
            base, optional = _base_type(f.type)
            kind = "int list" if base is list else base.__name__
            default = f.default if f.default is not dataclasses.MISSING else None
            lines.append(f"  --{f.name} ({kind}, default {default!r})")
            lines.append(f"      {f.metadata.get('help', '')}")
    lines += ["", "Accepted for PaddleNLP compatibility and ignored: " + ", ".join(sorted(IGNORED_KEYS)) + "."]
    return "\n".join(lines)
