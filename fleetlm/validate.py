"""Checks of a whole run before any worker does real work: layout, batch, model, parallel options.

``plan_run`` is a pure function of the parsed arguments and the world size, so every rank reaches
the same verdict without communicating. Rank 0 prints it and all ranks exit non-zero.
"""

import os
from dataclasses import dataclass

from typing import Optional

from fleetlm.arguments import Arguments, ConfigError
from fleetlm.data.blended_dataset import BlendedDataset
from fleetlm.models.config import ModelConfig, load_model_config
from fleetlm.parallel.topology import Layout, resolve_layout
from fleetlm.trainer.checkpoint import list_checkpoints
from fleetlm.trainer.lr import resolve_warmup_steps
from fleetlm.trainer.trainer import BatchPlan
from fleetlm.utils.log import get_logger

logger = get_logger(__name__)


@dataclass
class RunPlan:
    """Plan of a validated run: model architecture, parallel layout and batch division."""

    model_config: ModelConfig
    layout: Layout
    batch: BatchPlan


def _check_parallel_options(args: Arguments, layout: Layout, model_config: ModelConfig, accumulation: int) -> None:
    """Reject a layout that the model, the pipeline schedule or Paddle's engine cannot run."""
    t, m = args.training, args.model
    tp, pp, vpp = layout.tp_degree, layout.pp_degree, m.virtual_pp_degree

    if t.sharding_parallel_degree > 1 and not t.sharding:
        raise ConfigError(
            f"sharding_parallel_degree={t.sharding_parallel_degree} needs a sharding stage; set --sharding stage1, "
            "stage2 or stage3, or leave sharding_parallel_degree at -1."
        )
    if tp > 1:
        for key, value in (
            ("num_attention_heads", model_config.num_attention_heads),
            ("num_key_value_heads", model_config.num_key_value_heads),
            ("vocab_size", model_config.vocab_size),
            ("intermediate_size", model_config.intermediate_size),
        ):
            if value % tp:
                raise ConfigError(
                    f"{key}={value} is not divisible by tensor_parallel_degree={tp}; each tensor-parallel rank "
                    f"holds {key} / {tp}. Choose a degree that divides it or change {key}."
                )
    if t.sequence_parallel:
        if tp == 1:
            raise ConfigError(
                "sequence_parallel=true needs tensor_parallel_degree > 1: it splits the sequence over the "
                "tensor-parallel ranks. Set tensor_parallel_degree or turn sequence_parallel off."
            )
        if args.data.max_seq_length % tp:
            raise ConfigError(
                f"sequence_parallel: max_seq_length={args.data.max_seq_length} is not divisible by "
                f"tensor_parallel_degree={tp}."
            )
    if vpp > 1 and pp < 3:
        raise ConfigError(
            f"virtual_pp_degree={vpp} needs pipeline_parallel_degree >= 3 (Paddle's interleaved schedule asserts "
            f"pp_degree > 2), but pipeline_parallel_degree={pp}."
        )
    if model_config.num_hidden_layers % (pp * vpp):
        raise ConfigError(
            f"num_hidden_layers={model_config.num_hidden_layers} is not divisible by pipeline_parallel_degree={pp} x "
            f"virtual_pp_degree={vpp} = {pp * vpp}; every pipeline chunk must hold the same number of layers."
        )
    if pp > 1:
        # Interleaved 1F1B (Paddle 3.3.1 PipelineParallelWithInterleave) asserts >= 2 x pp micro-batches.
        needed = 2 * pp if vpp > 1 else pp
        schedule = "interleaved 1F1B" if vpp > 1 else "1F1B"
        if accumulation < needed:
            raise ConfigError(
                f"pipeline_parallel_degree={pp}: gradient accumulation steps={accumulation} give fewer micro-batches "
                f"than the {schedule} schedule needs ({needed}); raise gradient_accumulation_steps or "
                "global_batch_size."
            )
        if (t.do_eval or t.do_predict) and t.eval_iters < needed:
            raise ConfigError(
                f"pipeline_parallel_degree={pp}: evaluation runs its eval_iters={t.eval_iters} batches as the "
                f"micro-batches of one {schedule} pass, which needs at least {needed}; raise eval_iters."
            )
        if t.sharding in ("stage2", "stage3"):
            raise ConfigError(
                f"sharding={t.sharding} cannot be combined with pipeline_parallel_degree={pp}: Paddle's "
                "group_sharded_parallel does not drive a pipeline. Use sharding stage1 with pipeline parallelism."
            )
    if t.recompute and t.no_recompute_layers:
        bad = [i for i in t.no_recompute_layers if not 0 <= i < model_config.num_hidden_layers]
        if bad:
            raise ConfigError(
                f"no_recompute_layers={t.no_recompute_layers} lists {bad}, outside the model's layers "
                f"0..{model_config.num_hidden_layers - 1}."
            )


def _plan_batch(args: Arguments, layout: Layout) -> BatchPlan:
    t = args.training
    # Sharding ranks read different samples like data-parallel ranks.
    micro, dp = t.per_device_train_batch_size, layout.data_parallel_width
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
                f"(which needs {derived} with micro-batch {micro} and dp {dp}); set only one of them, e.g. "
                f"--global_batch_size 0 to keep gradient_accumulation_steps={accumulation}, or "
                f"--gradient_accumulation_steps {derived} to keep global_batch_size={t.global_batch_size}."
            )
        accumulation = derived
    return BatchPlan(micro_batch_size=micro, accumulation_steps=accumulation, dp_degree=dp, seq_len=args.data.max_seq_length)


def plan_run(args: Arguments, world_size: int) -> RunPlan:
    """Validate everything that can be checked without data or communication; raise ConfigError."""
    layout = resolve_layout(args.training, world_size)
    batch = _plan_batch(args, layout)
    model_config = load_model_config(args.model)
    # Recompute is applied from outside the model (fleetlm.parallel.recompute); the model's own
    # full-block switch stays off so blocks are not recomputed twice.
    model_config.recompute = False
    model_config.recompute_granularity = args.training.recompute_granularity
    _check_parallel_options(args, layout, model_config, batch.accumulation_steps)

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
            "registered name (no weights are downloaded). Point it at a directory with config.json and weights "
            "(model.safetensors, pytorch_model.bin or model_state.pdparams, sharded with an index file or not), "
            "or set continue_training false to start from random weights."
        )
    _check_output_dir(t.output_dir)
    if t.do_train and t.resume_from_checkpoint is None:
        existing = list_checkpoints(t.output_dir)
        if existing:
            overwrite = ""
            if str(args.ignored.get("overwrite_output_dir", "")).lower() in ("true", "1", "yes"):
                overwrite = (" overwrite_output_dir is not supported: fleetlm never deletes checkpoints, so remove "
                             "them yourself to start again in this directory.")
            raise ConfigError(
                f"output_dir='{t.output_dir}' already contains {os.path.basename(existing[-1][1])}; starting again would "
                f"overwrite it. Pass --resume_from_checkpoint true to continue, or choose another output_dir.{overwrite}"
            )
    if args.model.tokenizer_name_or_path:
        _check_tokenizer(args.model.tokenizer_name_or_path, model_config)
    return RunPlan(model_config=model_config, layout=layout, batch=batch)


def warmup_warning(args: Arguments) -> Optional[str]:
    """Return a warning when the warmup keeps the schedule from working as set, else None.

    Two cases: the warmup is longer than the run, so the learning rate never peaks, or it reaches
    decay_steps, so the rate drops from its peak to min_learning_rate in one step.
    """
    t = args.training
    warmup = resolve_warmup_steps(t)
    if not t.do_train:
        return None
    source = f"warmup_steps={warmup}" if t.warmup_steps > 0 else f"warmup_ratio={t.warmup_ratio} gives {warmup} steps, which"
    if warmup > t.max_steps:
        return _warmup_longer_than_run(t, warmup, source)
    if _warmup_covers_decay(t, warmup):
        return _warmup_reaches_decay(t, warmup, source)
    return None


def _warmup_longer_than_run(t, warmup: int, source: str) -> str:
    # The rate of step t (1-based) during warmup is learning_rate * t / warmup, so the last step's is the highest.
    fraction = t.max_steps / warmup
    return (
        f"{source} is larger than max_steps={t.max_steps}: the learning rate rises for the whole run and peaks at "
        f"{fraction:.1%} of learning_rate={t.learning_rate:g} ({t.learning_rate * fraction:.3g}) on the last step. "
        f"Set warmup_steps to at most {t.max_steps} for the schedule to reach learning_rate."
    )


def _warmup_covers_decay(t, warmup: int) -> bool:
    """Return True when a warmup reaches decay_steps, so the decay has no steps."""
    # WarmupDecayLR (fleetlm.trainer.lr) decays from the end of warmup to decay_steps (0: max_steps)
    # and uses min_learning_rate from then on, except that 'constant' keeps learning_rate.
    return (
        t.decay_steps > 0
        and warmup >= t.decay_steps
        and t.lr_scheduler_type != "constant"
        and t.min_learning_rate != t.learning_rate
    )


def _warmup_reaches_decay(t, warmup: int, source: str) -> str:
    if t.max_steps > warmup:
        effect = (
            f"then drops to min_learning_rate={t.min_learning_rate:g} on step {warmup + 1} and stays there for the "
            f"remaining {t.max_steps - warmup} of max_steps={t.max_steps} steps"
        )
    else:
        effect = f"the last of max_steps={t.max_steps} steps, and never decays"
    return (
        f"{source} is at least decay_steps={t.decay_steps}, so the {t.lr_scheduler_type} decay has no steps: "
        f"the learning rate rises to learning_rate={t.learning_rate:g} on step {warmup}, {effect}. Set decay_steps "
        f"above {warmup} (0 decays until max_steps), or lower the warmup below decay_steps."
    )


def sharding_warning(args: Arguments, layout: Layout) -> Optional[str]:
    """Return a warning when a sharding stage is set but the sharding degree is 1, so nothing is sharded."""
    t = args.training
    if not t.sharding or layout.sharding_degree > 1:
        return None
    shared = {"stage1": "optimizer state", "stage2": "optimizer state and gradients",
              "stage3": "optimizer state, gradients and parameters"}[t.sharding]
    return (
        f"sharding={t.sharding} with a sharding degree of 1 (sharding_parallel_degree={t.sharding_parallel_degree} "
        f"in a {layout.world_size}-process run) divides nothing: every rank keeps the whole {shared}. Set "
        "sharding_parallel_degree above 1, or -1 with several data-parallel ranks, or leave sharding unset."
    )


def distinct_samples(dataset) -> int:
    """Return how many leading samples of a GPTDataset or BlendedDataset come from one pass over its tokens.

    A GPTDataset that needs more samples than that starts another epoch, so its later samples
    repeat documents already read. A blend repeats from its first sample whose source has passed
    that point.
    """
    if isinstance(dataset, BlendedDataset):
        one_pass = [distinct_samples(source) if source is not None else 0 for source in dataset.datasets]
        beyond = [i for i, (source, number) in enumerate(zip(dataset.source_index, dataset.source_sample_index))
                  if number >= one_pass[source]]
        return beyond[0] if beyond else len(dataset)
    # One epoch of T tokens contains (T - 1) // S samples of S + 1 tokens (fleetlm.data.gpt_dataset.epochs_needed).
    return min(len(dataset), (dataset.tokens_per_epoch - 1) // dataset.seq_length)


def eval_repeat_warning(args: Arguments, dataset, split_name: str, data_parallel_width: int) -> Optional[str]:
    """Return a warning when one evaluation reads more samples than ``dataset`` contains without repeating."""
    t = args.training
    per_iteration = t.per_device_eval_batch_size * data_parallel_width
    needed = t.eval_iters * per_iteration
    distinct = distinct_samples(dataset)
    if distinct >= needed:
        return None
    if distinct >= per_iteration:
        fix = f"set eval_iters to at most {distinct // per_iteration} to read each sample once"
    elif distinct >= data_parallel_width:
        fix = (f"even eval_iters=1 reads {per_iteration}; lower per_device_eval_batch_size to at most "
               f"{distinct // data_parallel_width} or give the {split_name} split a larger weight in split")
    else:
        fix = f"give the {split_name} split a larger weight in split"
    return (
        f"the {split_name} set has {distinct} distinct samples, but each evaluation reads eval_iters={t.eval_iters} x "
        f"per_device_eval_batch_size={t.per_device_eval_batch_size} x data-parallel degree {data_parallel_width} = "
        f"{needed}, so samples repeat within one evaluation; {fix}."
    )


def _check_output_dir(output_dir: str) -> None:
    """Reject an output_dir that cannot be created or written, without creating it."""
    if not output_dir:
        raise ConfigError("output_dir is empty; set it to the directory for checkpoints and metrics.")
    path = os.path.abspath(output_dir)
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise ConfigError(f"output_dir='{output_dir}' exists and is not a directory; choose another output_dir.")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError(f"output_dir='{output_dir}' is not writable; fix its permissions or choose another.")
        return
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(
            f"output_dir='{output_dir}' cannot be created: '{parent}' is not a writable directory; choose another."
        )


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
