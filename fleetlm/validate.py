"""Checks of a whole run before any worker does real work: layout, batch, model, options not built yet.

``plan_run`` is a pure function of the parsed arguments and the world size, so every rank reaches
the same verdict without communicating; rank 0 prints it and all ranks exit non-zero.
"""

import os
from dataclasses import dataclass

from fleetlm.arguments import Arguments, ConfigError
from fleetlm.models.config import ModelConfig, load_model_config
from fleetlm.parallel.topology import Layout, resolve_layout
from fleetlm.trainer.checkpoint import list_checkpoints
from fleetlm.trainer.trainer import BatchPlan
from fleetlm.utils.log import get_logger

logger = get_logger(__name__)


@dataclass
class RunPlan:
    """What a validated run will build."""

    model_config: ModelConfig
    layout: Layout
    batch: BatchPlan


def _reject_unbuilt_parallel_options(args: Arguments) -> None:
    """Options whose implementation is not in this version: accepted only at their single-process values."""
    t, m = args.training, args.model
    unbuilt = {
        "tensor_parallel_degree": (t.tensor_parallel_degree, 1),
        "pipeline_parallel_degree": (t.pipeline_parallel_degree, 1),
        "virtual_pp_degree": (m.virtual_pp_degree, 1),
        "sharding": (t.sharding, ""),
        "sequence_parallel": (t.sequence_parallel, False),
        "pipeline_parallel_config": (t.pipeline_parallel_config, ""),
        "tensor_parallel_config": (t.tensor_parallel_config, ""),
        "sharding_parallel_config": (t.sharding_parallel_config, ""),
        "no_recompute_layers": (t.no_recompute_layers, None),
    }
    for key, (value, supported) in unbuilt.items():
        if value != supported:
            raise ConfigError(
                f"{key}={value!r} is not supported yet in this fleetlm version; only {supported!r} is. "
                "Use data parallelism (launch more processes) for now."
            )
    if t.sharding_parallel_degree not in (-1, 1):
        raise ConfigError(
            f"sharding_parallel_degree={t.sharding_parallel_degree} is not supported yet in this fleetlm version; "
            "only -1 or 1 (no sharding) is."
        )
    if (t.bf16 or t.fp16) and _gpu_build():
        raise ConfigError(
            "bf16/fp16 mixed precision is not supported yet in this fleetlm version on GPU builds; set bf16 and "
            "fp16 to false to train in fp32. (CPU builds accept them and train in fp32, with a warning.)"
        )
    if t.recompute and t.recompute_granularity != "full":
        raise ConfigError(
            f"recompute_granularity='{t.recompute_granularity}' is not supported yet in this fleetlm version; "
            "only 'full' is."
        )


def _gpu_build() -> bool:
    import paddle

    return paddle.is_compiled_with_cuda()


def _plan_batch(args: Arguments, layout: Layout) -> BatchPlan:
    t = args.training
    micro, dp = t.per_device_train_batch_size, layout.dp_degree
    accumulation = t.gradient_accumulation_steps
    if t.global_batch_size > 0:
        per_step = micro * dp
        if t.global_batch_size % per_step:
            raise ConfigError(
                f"global_batch_size={t.global_batch_size} is not divisible by per_device_train_batch_size={micro} "
                f"x data-parallel degree {dp} = {per_step}; choose a multiple of {per_step}."
            )
        derived = t.global_batch_size // per_step
        if accumulation not in (1, derived):
            raise ConfigError(
                f"gradient_accumulation_steps={accumulation} contradicts global_batch_size={t.global_batch_size} "
                f"(which needs {derived} with micro-batch {micro} and dp {dp}); set only one of them."
            )
        accumulation = derived
    return BatchPlan(micro_batch_size=micro, accumulation_steps=accumulation, dp_degree=dp, seq_len=args.data.max_seq_length)


def plan_run(args: Arguments, world_size: int) -> RunPlan:
    """Validate everything that can be checked without data or communication; raise ConfigError."""
    _reject_unbuilt_parallel_options(args)
    layout = resolve_layout(args.training, world_size)
    batch = _plan_batch(args, layout)
    model_config = load_model_config(args.model)
    model_config.recompute = args.training.recompute
    model_config.recompute_granularity = args.training.recompute_granularity

    if args.data.max_seq_length > model_config.max_position_embeddings:
        raise ConfigError(
            f"max_seq_length={args.data.max_seq_length} is longer than the model's "
            f"max_position_embeddings={model_config.max_position_embeddings}; lower max_seq_length or "
            "raise max_position_embeddings."
        )
    t = args.training
    if not t.do_train and not t.do_eval and not t.do_predict:
        raise ConfigError("do_train, do_eval and do_predict are all false: there is nothing to run.")
    if args.model.continue_training and not os.path.isdir(args.model.model_name_or_path):
        raise ConfigError(
            f"continue_training=true needs weights, but model_name_or_path='{args.model.model_name_or_path}' is a "
            "registered name (no weights are downloaded). Point it at a directory with config.json and "
            "model_state.pdparams, or set continue_training false to start from random weights."
        )
    if t.do_train and t.resume_from_checkpoint is None:
        existing = list_checkpoints(t.output_dir)
        if existing:
            raise ConfigError(
                f"output_dir='{t.output_dir}' already holds {os.path.basename(existing[-1][1])}; starting again would "
                "overwrite it. Pass --resume_from_checkpoint true to continue, or choose another output_dir."
            )
    if args.model.tokenizer_name_or_path:
        _check_tokenizer(args.model.tokenizer_name_or_path, model_config)
    return RunPlan(model_config=model_config, layout=layout, batch=batch)


def _check_tokenizer(path: str, model_config: ModelConfig) -> None:
    from fleetlm.tokenizer import TokenizerError, load_tokenizer

    try:
        tokenizer = load_tokenizer(path)
    except TokenizerError as e:
        raise ConfigError(f"tokenizer_name_or_path='{path}': {e}") from None
    if tokenizer.vocab_size > model_config.vocab_size:
        raise ConfigError(
            f"the tokenizer at '{path}' has {tokenizer.vocab_size} ids but the model's vocab_size is "
            f"{model_config.vocab_size}; set vocab_size to at least {tokenizer.vocab_size}."
        )
