"""Entry point of ``run_pretrain.py``: validate, start fleet, build data and model, train, evaluate.

Exit codes: 0 success, 2 invalid arguments or data (nothing written), 3 a non-finite loss,
130 stopped by SIGINT (Ctrl-C), 143 stopped by SIGTERM, 1 anything else.
"""

import logging
import os
import pickle
import random
import signal
import sys
from typing import List, NoReturn, Optional

from fleetlm.arguments import Arguments, ConfigError, format_help, parse_arguments
from fleetlm.utils.log import get_logger, process_rank, world_size

logger = get_logger(__name__)

EXIT_CONFIG = 2
EXIT_NON_FINITE = 3
# This rank's collective failed because another process of the job stopped (killed, crashed).
EXIT_PEER_LOST = 4
# Shells report a process ended by signal N as 128 + N; a run stopped on SIGINT or SIGTERM exits with it too.
EXIT_SIGNAL_BASE = 128
# Sharding stage 3 slices only parameters with more elements than this (Paddle's default: 2**20);
# tests lower it so the tiny model's parameters are sliced too.
STAGE3_SEGMENT_SIZE_ENV = "FLEETLM_STAGE3_SEGMENT_SIZE"


class RunComplete(ConfigError):
    """resume_from_checkpoint=true found a checkpoint at max_steps: the run has nothing left to do."""


def _fail(message: str, code: int) -> int:
    # Every rank reaches the same verdict; one copy of the message is enough.
    if process_rank() == 0:
        logger.error("%s", message)
    return code


def _where_to_resume(output_dir: str) -> str:
    """Name the latest complete checkpoint in output_dir and how to continue from it."""
    from fleetlm.trainer import checkpoint as ckpt

    checkpoints = ckpt.list_checkpoints(output_dir)
    if checkpoints:
        step, path = checkpoints[-1]
        return (f"The latest complete checkpoint is {path} (step {step}); continue from it with "
                "--resume_from_checkpoint true.")
    return f"No checkpoint was saved in {output_dir}, so a rerun starts from step 0."


def _report_interrupt(signal_number: int, trainer, output_dir: str, max_steps: int) -> int:
    """Log one line with the step reached, the latest complete checkpoint and how to resume; return 128 + signal."""
    name = signal.Signals(signal_number).name
    where = f"at step {trainer.step} of {max_steps}" if trainer is not None else "before training started"
    logger.warning("run interrupted by %s %s. %s", name, where, _where_to_resume(output_dir))
    return EXIT_SIGNAL_BASE + signal_number


# Words of the errors that gloo and NCCL raise on a rank whose peer has gone.
_PEER_LOSS_MARKERS = ("connection reset by peer", "connection closed by peer", "broken pipe", "gloo", "nccl",
                      "timed out", "timeout")


def _is_peer_loss(error: BaseException) -> bool:
    text = str(error).lower()
    return any(marker in text for marker in _PEER_LOSS_MARKERS)


def _report_peer_loss(error: BaseException, trainer, output_dir: str, max_steps: int) -> int:
    """Log why a collective failed on this rank, where to resume, and return EXIT_PEER_LOST."""
    first_line = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
    logger.error(
        "a collective operation failed at step %d of %s (%s): another process of the job has most likely stopped. "
        "Its own log names the cause (the launcher's log_dir, workerlog.RANK; a process killed by signal 9 is often "
        "the out-of-memory killer's doing). %s",
        trainer.step, max_steps, first_line, _where_to_resume(output_dir),
    )
    logger.debug("collective failure", exc_info=error)
    return EXIT_PEER_LOST


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


class _RunProgress:
    """Objects ``_run`` has built so far, for the report when a signal stops it, and the output_dir lock."""

    trainer = None
    lock = None


def run(args: Arguments) -> int:
    """Run one validated job on this rank; returns the process exit code."""
    from fleetlm.trainer.interrupt import RunInterrupted

    progress = _RunProgress()
    try:
        return _run(args, progress)
    except RunInterrupted as e:
        signal_number = e.signal_number
    except KeyboardInterrupt:
        # SIGINT in a caller that did not install main()'s handlers.
        signal_number = signal.SIGINT
    finally:
        if progress.lock is not None:
            progress.lock.release()
    return _report_interrupt(signal_number, progress.trainer, args.training.output_dir, args.training.max_steps)


def _run(args: Arguments, progress: _RunProgress) -> int:
    """Validate, build and train; store the trainer in ``progress`` once it has resumed."""
    from fleetlm.data import DataError
    from fleetlm.parallel.topology import init_topology
    from fleetlm.trainer import checkpoint as ckpt
    from fleetlm.trainer.resume_changes import resume_change_warnings
    from fleetlm.trainer.run_lock import OutputDirLock
    from fleetlm.trainer.trainer import NonFiniteLossError
    from fleetlm.validate import eval_repeat_warning, plan_run, sharding_warning, warmup_warning

    from fleetlm.data.token_range import check_token_ids

    def verify_resumable(path: str) -> None:
        # Sizes first: a truncated or missing config.json is damage to skip, not a reason to stop.
        ckpt.verify_file_sizes(path)
        _check_resume(path, args, plan)

    def take_lock() -> None:
        if process_rank() == 0 and progress.lock is None:
            progress.lock = OutputDirLock(args.training.output_dir)
            progress.lock.acquire()

    try:
        output_dir = args.training.output_dir
        if output_dir and os.path.isdir(output_dir) and os.access(output_dir, os.W_OK):
            # A run already in this output_dir is reported before any message about the directory's contents.
            take_lock()
        plan = plan_run(args, world_size())
        resume_path = ckpt.resolve_resume_path(
            args.training.resume_from_checkpoint, args.training.output_dir, verify_resumable
        )
        resume_state = _check_resume(resume_path, args, plan) if resume_path else None
        check_token_ids(args.data.input_dir, plan.model_config.vocab_size, args.data.data_cache)
        if resume_path is not None:
            ckpt.check_resume_into(resume_path, output_dir)
        # Before anything writes into output_dir (and creates it): a second run there stops here.
        take_lock()
    except RunComplete as e:
        # A finished run started again (a retried job, a rerun script): nothing to do is success.
        logger.info("%s", e)
        return 0
    except (ConfigError, ckpt.CheckpointError, DataError) as e:
        return _fail(str(e), EXIT_CONFIG)
    if resume_state is not None and process_rank() == 0:
        saved_arguments = _read_saved_config(resume_path).get("arguments", {})
        for warning in resume_change_warnings(resume_path, saved_arguments, args.to_dict(), resume_state.step,
                                              resume_state.consumed_samples):
            logger.warning("%s", warning)
    for warning in (warmup_warning(args), sharding_warning(args, plan.layout)):
        if warning and process_rank() == 0:
            logger.warning("%s", warning)
    for key, value in args.ignored.items():
        logger.info("ignoring PaddleNLP argument %s=%r: %s", key, value, _ignored_reason(key))
    for message in args.overridden.values():
        logger.info("%s", message)

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
        _check_same_resume_step(resume_state, topology)
    except ckpt.CheckpointError as e:
        return _fail(str(e), EXIT_CONFIG)

    try:
        train_ds, valid_ds, test_ds = build_datasets(args, plan, topology, resume_state)
    except DataError as e:
        return _fail(f"data: {e}", EXIT_CONFIG)
    logger.info(
        "datasets: train %s, valid %s, test %s samples of %d tokens",
        *(len(d) if d is not None else 0 for d in (train_ds, valid_ds, test_ds)),
        args.data.max_seq_length,
    )
    for dataset, split_name in ((valid_ds, "valid"), (test_ds, "test")):
        warning = eval_repeat_warning(args, dataset, split_name, plan.layout.data_parallel_width) if dataset is not None else None
        if warning and topology.rank == 0:
            logger.warning("%s", warning)

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
            # paddle.load and pickle raise these on a damaged file; its size matched the saved one
            # (verify_file_sizes), so the damage is inside it.
            return _fail(
                f"cannot load checkpoint {resume_path} ({type(e).__name__}: {e}); a file in it is damaged. "
                "Resume from an older checkpoint: --resume_from_checkpoint OUTPUT_DIR/checkpoint-STEP.",
                EXIT_CONFIG,
            )
        if topology.rank == 0:
            ckpt.set_aside_newer(args.training.output_dir, resume_state.step, resume_path)
    progress.trainer = trainer

    try:
        if args.training.do_train:
            trainer.train()
        else:
            _evaluate_only(trainer, args)
    except NonFiniteLossError as e:
        return _fail(str(e), EXIT_NON_FINITE)
    except (RuntimeError, OSError) as e:
        if not topology.is_distributed or not _is_peer_loss(e):
            raise
        return _report_peer_loss(e, trainer, args.training.output_dir, args.training.max_steps)
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
    elif os.path.isdir(args.model.model_name_or_path):
        logger.info("model_name_or_path=%s gives the architecture only; the model starts from random weights "
                    "(set continue_training true to load the directory's weights)", args.model.model_name_or_path)
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
    run_config = {
        "arguments": args.to_dict(),
        "model": plan.model_config.architecture_dict(),
        "layout": _layout_record(args, plan),
    }
    return Trainer(args, plan.model_config, model, topology, plan.batch, train_ds, valid_ds, test_ds, run_config,
                   options)


def _layout_record(args: Arguments, plan) -> dict:
    """Return the layout as checkpoints record it: degrees, world size and the options that shape the shards."""
    t = args.training
    return dict(plan.layout.to_dict(), world_size=plan.layout.world_size, sharding=t.sharding,
                sequence_parallel=t.sequence_parallel, virtual_pp_degree=args.model.virtual_pp_degree)


def _evaluate_only(trainer, args: Arguments) -> None:
    if args.training.do_eval and trainer.valid_dataset is not None:
        logger.info("eval loss %.4f", trainer.evaluate(trainer.valid_dataset, "valid"))
    if args.training.do_predict and trainer.test_dataset is not None:
        logger.info("test loss %.4f", trainer.evaluate(trainer.test_dataset, "test"))


def _check_resume(path: str, args: Arguments, plan):
    """Read a checkpoint's state and reject a resume that cannot continue it, before any work starts.

    Raises DamagedCheckpointError for an unreadable trainer_state.json or config.json, and
    ConfigError when the run has nothing left to train or its model architecture differs.
    """
    from fleetlm.trainer import checkpoint as ckpt

    state = ckpt.read_trainer_state(path)
    t = args.training
    if t.do_train and state.step >= t.max_steps:
        if state.step == t.max_steps and str(t.resume_from_checkpoint).lower() == "true":
            raise RunComplete(f"{path} is at max_steps={t.max_steps}: the run in {t.output_dir} is complete and there "
                              "is nothing to train; raise max_steps to train further.")
        raise ConfigError(
            f"{path} is at step {state.step}, and max_steps={t.max_steps} leaves nothing to train; "
            "raise max_steps to continue training."
        )
    saved_model = _read_saved_config(path).get("model", {})
    current = plan.model_config.architecture_dict()
    changed = {k: (saved_model[k], v) for k, v in current.items() if k in saved_model and saved_model[k] != v}
    if changed:
        listing = ", ".join(f"{k}: saved {old!r}, requested {new!r}" for k, (old, new) in sorted(changed.items()))
        requested_layout = _layout_record(args, plan)
        if state.layout == requested_layout:
            layout_note = ""
        else:
            # Another layout alone could be resumed; name it only so the two differences are not confused.
            layout_note = (f" The layout differs too (saved layout {state.layout}, requested layout "
                           f"{plan.layout.describe()}), which resuming supports.")
        raise ConfigError(
            f"resume_from_checkpoint: {path} cannot be resumed because the model architecture differs from the "
            f"checkpoint's ({listing}).{layout_note} Resume with the checkpoint's architecture, or start a new run "
            "with continue_training from its weights."
        )
    return state


def _read_saved_config(path: str) -> dict:
    """Return a checkpoint's config.json ("arguments", "model", "layout"); raise DamagedCheckpointError if unreadable."""
    import json

    from fleetlm.trainer import checkpoint as ckpt

    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
    except OSError as e:
        raise ckpt.DamagedCheckpointError(path, "config.json", f"{type(e).__name__}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ckpt.DamagedCheckpointError(path, "config.json", f"not UTF-8 text: {e.reason}") from None
    except json.JSONDecodeError as e:
        raise ckpt.DamagedCheckpointError(path, "config.json", f"not valid JSON: {e.msg}") from None
    if not isinstance(config, dict) or not all(isinstance(config.get(key, {}), dict) for key in ("model", "arguments")):
        raise ckpt.DamagedCheckpointError(path, "config.json", "expected a JSON object with model and arguments objects")
    return config


def _check_same_resume_step(resume_state, topology) -> None:
    """Raise CheckpointError unless every rank chose a checkpoint of the same step (or none).

    Each rank picks the checkpoint by checking the same files in the same order, so they agree unless
    a file reads differently on different ranks (a node without the shared file system, a copy in
    progress). Resuming from different steps would silently mix two training states.
    """
    if not topology.is_distributed:
        return
    import paddle
    import paddle.distributed as dist

    from fleetlm.trainer.checkpoint import CheckpointError

    step = resume_state.step if resume_state is not None else -1
    gathered: List = []
    dist.all_gather(gathered, paddle.to_tensor([step], dtype="int64"))
    steps = [int(tensor.item()) for tensor in gathered]
    if len(set(steps)) > 1:
        listing = ", ".join(f"rank {rank}: {step if step >= 0 else 'none'}" for rank, step in enumerate(steps))
        raise CheckpointError(
            f"ranks chose checkpoints of different steps to resume from ({listing}). A checkpoint file reads "
            "differently on different ranks; check that output_dir is on a file system that every node shares "
            "and that nothing writes to it, then retry."
        )


def _ignored_reason(key: str) -> str:
    from fleetlm.arguments import IGNORED_KEYS

    return IGNORED_KEYS[key]


def exit_process(code: int) -> NoReturn:
    """End the process with status ``code``; a launched worker that finished its run skips interpreter teardown.

    NOTE: Paddle's teardown at interpreter exit (atexit callbacks that destroy the process groups
    and clear the kernel registry) has ended processes that had finished all their work with a
    failure: a 2-process test worker died of SIGSEGV there, and a sharding stage 3 run ended with a
    non-zero launcher status after rank 0 had saved its last checkpoint and logged "done". Both are
    rare and their cause is not known. Under the launcher one such rank marks the whole job failed.
    Everything fleetlm
    writes is closed and synced when ``main`` returns, so a launched worker with status 0 flushes its
    logs and leaves with ``os._exit``. Failures keep the normal exit and its traceback.
    """
    if code == 0 and world_size() > 1:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    sys.exit(code)


def _take_dry_run(argv: List[str]) -> tuple:
    """Remove ``--dry_run`` (alone, or followed by true/false like the other switches) from argv; return (on, rest)."""
    dry_run, rest, i = False, [], 0
    while i < len(argv):
        if argv[i] == "--dry_run":
            following = argv[i + 1].lower() if i + 1 < len(argv) else ""
            if following in ("true", "false"):
                dry_run = following == "true"
                i += 2
                continue
            dry_run = True
        else:
            rest.append(argv[i])
        i += 1
    return dry_run, rest


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(format_help())
        return 0
    dry_run, argv = _take_dry_run(argv)
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

    # SIGINT and SIGTERM end the run with one line of where it stopped instead of a traceback.
    # Paddle's import installs its own SIGTERM handler, which fleetlm's must replace.
    import paddle  # noqa: F401

    from fleetlm.trainer import interrupt

    restore_handlers = interrupt.install(defer=world_size() > 1)
    try:
        return run(args)
    finally:
        restore_handlers()
