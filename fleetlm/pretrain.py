"""Entry point of ``run_pretrain.py``: validate, start fleet, build data and model, train, evaluate.

Exit codes: 0 success, 2 invalid arguments or data (nothing written), 3 a non-finite loss,
1 anything else.
"""

import os
import pickle
import random
import sys
from typing import List, Optional

from fleetlm.arguments import Arguments, ConfigError, format_help, parse_arguments
from fleetlm.utils.log import get_logger, process_rank, world_size

logger = get_logger(__name__)

EXIT_CONFIG = 2
EXIT_NON_FINITE = 3
# Sharding stage 3 slices only parameters with more elements than this (Paddle's default: 2**20);
# tests lower it so the tiny model's parameters are sliced too.
STAGE3_SEGMENT_SIZE_ENV = "FLEETLM_STAGE3_SEGMENT_SIZE"


def _fail(message: str, code: int) -> int:
    # Every rank reaches the same verdict; one copy of the message is enough.
    if process_rank() == 0:
        logger.error("%s", message)
    return code


def _seed_everything(seed: int) -> None:
    import numpy as np
    import paddle

    random.seed(seed)
    np.random.seed(seed)
    paddle.seed(seed)


def build_datasets(args: Arguments, plan, topology, resume_state=None):
    """Build the train/valid/test datasets with the number of samples the run will read.

    A resumed run reads the samples after the checkpoint's consumed_samples, whose global batch may
    differ from this run's (fewer processes, another batch size).
    """
    import paddle.distributed as dist

    from fleetlm.data import build_pretraining_datasets

    t = args.training
    start_step, consumed = (resume_state.step, resume_state.consumed_samples) if resume_state else (0, 0)
    remaining_steps = max(0, t.max_steps - start_step)
    train_samples = consumed + remaining_steps * plan.batch.global_batch_size if t.do_train else 0
    eval_samples = t.eval_iters * t.per_device_eval_batch_size * plan.layout.data_parallel_width
    valid_samples = eval_samples if t.do_eval else 0
    test_samples = eval_samples if t.do_predict else 0
    barrier = dist.barrier if topology.is_distributed else None
    return build_pretraining_datasets(
        args.data.input_dir,
        args.data.split,
        args.data.max_seq_length,
        t.seed,
        (train_samples, valid_samples, test_samples),
        data_cache=args.data.data_cache,
        # Without a shared folder every node builds its own index cache, on its first local rank.
        rank=topology.rank if args.data.share_folder else int(os.environ.get("PADDLE_LOCAL_RANK", topology.rank)),
        barrier=barrier,
    )


def run(args: Arguments) -> int:
    """Run one validated job on this rank; returns the process exit code."""
    from fleetlm.data import DataError
    from fleetlm.parallel.topology import init_topology
    from fleetlm.trainer import checkpoint as ckpt
    from fleetlm.trainer.trainer import NonFiniteLossError
    from fleetlm.validate import plan_run

    from fleetlm.data.token_range import check_token_ids

    try:
        plan = plan_run(args, world_size())
        resume_path = ckpt.resolve_resume_path(args.training.resume_from_checkpoint, args.training.output_dir)
        resume_state = _check_resume(resume_path, args, plan) if resume_path else None
        check_token_ids(args.data.input_dir, plan.model_config.vocab_size, args.data.data_cache)
    except (ConfigError, ckpt.CheckpointError, DataError) as e:
        return _fail(str(e), EXIT_CONFIG)
    for key, value in args.ignored.items():
        logger.info("ignoring PaddleNLP argument %s=%r: %s", key, value, _ignored_reason(key))

    t = args.training
    option_strings = {
        "pipeline_parallel_config": t.pipeline_parallel_config,
        "tensor_parallel_config": t.tensor_parallel_config,
        "sharding_parallel_config": t.sharding_parallel_config,
    }
    topology = init_topology(
        plan.layout, t.seed, plan.batch.micro_batch_size, plan.batch.accumulation_steps, t.sharding, option_strings
    )
    logger.info("layout: %s", plan.layout.describe())

    try:
        train_ds, valid_ds, test_ds = build_datasets(args, plan, topology, resume_state)
    except DataError as e:
        return _fail(f"data: {e}", EXIT_CONFIG)
    logger.info(
        "datasets: train %s, valid %s, test %s samples of %d tokens",
        *(len(d) if d is not None else 0 for d in (train_ds, valid_ds, test_ds)),
        args.data.max_seq_length,
    )

    try:
        trainer = build_trainer(args, plan, topology, train_ds, valid_ds, test_ds)
    except ConfigError as e:
        return _fail(str(e), EXIT_CONFIG)
    if topology.rank == 0:
        ckpt.remove_incomplete(args.training.output_dir)
    if resume_path is not None:
        try:
            trainer.resume(resume_path)
        except ckpt.CheckpointError as e:
            return _fail(str(e), EXIT_CONFIG)
        except (ValueError, EOFError, pickle.UnpicklingError) as e:
            # paddle.load and pickle raise these on a truncated or overwritten file.
            return _fail(
                f"cannot load checkpoint {resume_path} ({type(e).__name__}: {e}); a file in it is damaged. "
                "Resume from an older checkpoint: --resume_from_checkpoint OUTPUT_DIR/checkpoint-STEP.",
                EXIT_CONFIG,
            )

    try:
        if args.training.do_train:
            trainer.train()
        else:
            _evaluate_only(trainer, args)
    except NonFiniteLossError as e:
        return _fail(str(e), EXIT_NON_FINITE)
    logger.info("done")
    return 0


def build_trainer(args: Arguments, plan, topology, train_ds, valid_ds=None, test_ds=None):
    """Seed, build the model (random or continue_training weights) and wrap it in a Trainer."""
    from fleetlm.models import build_model
    from fleetlm.parallel.engine import ParallelOptions
    from fleetlm.trainer.trainer import Trainer

    _seed_everything(args.training.seed)
    model = build_model(plan.model_config)
    if args.model.continue_training:
        from fleetlm.models.weights import load_pretrained

        load_pretrained(model, plan.model_config, args.model.model_name_or_path)
    num_params = sum(int(p.numel()) for p in model.parameters())
    logger.info("model: %s, %.2fM parameters, %s", plan.model_config.model_type, num_params / 1e6,
                {k: v for k, v in plan.model_config.architecture_dict().items() if k != "model_type"})

    t = args.training
    options = ParallelOptions(
        sharding=t.sharding,
        sequence_parallel=t.sequence_parallel,
        virtual_pp_degree=args.model.virtual_pp_degree,
        recompute=t.recompute,
        recompute_granularity=t.recompute_granularity,
        no_recompute_layers=t.no_recompute_layers,
    )
    if os.environ.get(STAGE3_SEGMENT_SIZE_ENV):
        options.stage3_segment_size = int(os.environ[STAGE3_SEGMENT_SIZE_ENV])
    layout = dict(plan.layout.to_dict(), world_size=plan.layout.world_size, sharding=t.sharding,
                  sequence_parallel=t.sequence_parallel, virtual_pp_degree=args.model.virtual_pp_degree)
    run_config = {
        "arguments": args.to_dict(),
        "model": plan.model_config.architecture_dict(),
        "layout": layout,
    }
    return Trainer(args, plan.model_config, model, topology, plan.batch, train_ds, valid_ds, test_ds, run_config,
                   options)


def _evaluate_only(trainer, args: Arguments) -> None:
    if args.training.do_eval and trainer.valid_dataset is not None:
        logger.info("eval loss %.4f", trainer.evaluate(trainer.valid_dataset, "valid"))
    if args.training.do_predict and trainer.test_dataset is not None:
        logger.info("test loss %.4f", trainer.evaluate(trainer.test_dataset, "test"))


def _check_resume(path: str, args: Arguments, plan):
    """Read a checkpoint's state and reject a resume that cannot continue it, before any work starts."""
    import json

    from fleetlm.trainer import checkpoint as ckpt

    state = ckpt.read_trainer_state(path)
    if args.training.do_train and state.step >= args.training.max_steps:
        raise ConfigError(
            f"{path} is at step {state.step}, and max_steps={args.training.max_steps} leaves nothing to train; "
            "raise max_steps to continue training."
        )
    config_path = os.path.join(path, "config.json")
    try:
        with open(config_path, encoding="utf-8") as f:
            saved_model = json.load(f).get("model", {})
    except (OSError, ValueError) as e:
        raise ckpt.CheckpointError(f"{config_path} cannot be read ({e}); the checkpoint is damaged.") from None
    current = plan.model_config.architecture_dict()
    changed = {k: (saved_model[k], v) for k, v in current.items() if k in saved_model and saved_model[k] != v}
    if changed:
        listing = ", ".join(f"{k}: saved {old!r}, requested {new!r}" for k, (old, new) in sorted(changed.items()))
        raise ConfigError(
            f"resume_from_checkpoint: {path} cannot be resumed in this layout because the model differs from "
            f"the checkpoint's ({listing}); saved layout {state.layout}, requested layout "
            f"{plan.layout.describe()}. Resume with the checkpoint's architecture, or start a new run with "
            "continue_training from its weights."
        )
    return state


def _ignored_reason(key: str) -> str:
    from fleetlm.arguments import IGNORED_KEYS

    return IGNORED_KEYS[key]


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(format_help())
        return 0
    dry_run = "--dry_run" in argv
    argv = [a for a in argv if a != "--dry_run"]
    try:
        args = parse_arguments(argv)
        if dry_run:
            from fleetlm.dry_run import describe_run

            if process_rank() == 0:
                # Outside the launcher, size the layout from the argument file's degrees.
                print(describe_run(args, world_size() if "PADDLE_TRAINERS_NUM" in os.environ else None))
            return 0
    except ConfigError as e:
        return _fail(str(e), EXIT_CONFIG)
    return run(args)
