"""Entry point of ``run_pretrain.py``: validate, start fleet, build data and model, train, evaluate.

Exit codes: 0 success, 2 invalid arguments or data (nothing written), 3 a non-finite loss,
1 anything else.
"""

import os
import random
import sys
from typing import List, Optional

from fleetlm.arguments import Arguments, ConfigError, format_help, parse_arguments
from fleetlm.utils.log import get_logger, process_rank, world_size

logger = get_logger(__name__)

EXIT_CONFIG = 2
EXIT_NON_FINITE = 3


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


def build_datasets(args: Arguments, plan, topology):
    """Build the train/valid/test datasets with the number of samples the run will read."""
    import paddle.distributed as dist

    from fleetlm.data import build_pretraining_datasets

    t = args.training
    train_samples = t.max_steps * plan.batch.global_batch_size if t.do_train else 0
    eval_samples = t.eval_iters * t.per_device_eval_batch_size * plan.layout.dp_degree
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
        rank=topology.rank,
        barrier=barrier,
    )


def run(args: Arguments) -> int:
    """Run one validated job on this rank; returns the process exit code."""
    from fleetlm.data import DataError
    from fleetlm.parallel.topology import init_topology
    from fleetlm.trainer import checkpoint as ckpt
    from fleetlm.trainer.trainer import NonFiniteLossError
    from fleetlm.validate import plan_run

    try:
        plan = plan_run(args, world_size())
        resume_path = ckpt.resolve_resume_path(args.training.resume_from_checkpoint, args.training.output_dir)
    except (ConfigError, ckpt.CheckpointError) as e:
        return _fail(str(e), EXIT_CONFIG)
    for key, value in args.ignored.items():
        logger.info("ignoring PaddleNLP argument %s=%r: %s", key, value, _ignored_reason(key))

    topology = init_topology(plan.layout, args.training.seed)
    logger.info("layout: %s", plan.layout.describe())
    if (args.training.bf16 or args.training.fp16) and not _gpu_build():
        logger.warning("bf16/fp16 requested, but this Paddle build has no CUDA: training runs in fp32")

    try:
        train_ds, valid_ds, test_ds = build_datasets(args, plan, topology)
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
        trainer.resume(resume_path)

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
    from fleetlm.trainer.trainer import Trainer

    _seed_everything(args.training.seed)
    model = build_model(plan.model_config)
    if args.model.continue_training:
        _load_pretrained(model, args.model.model_name_or_path)
    num_params = sum(int(p.numel()) for p in model.parameters())
    logger.info("model: %s, %.2fM parameters, %s", plan.model_config.model_type, num_params / 1e6,
                {k: v for k, v in plan.model_config.architecture_dict().items() if k != "model_type"})

    run_config = {
        "arguments": args.to_dict(),
        "model": plan.model_config.architecture_dict(),
        "layout": {
            "dp_degree": plan.layout.dp_degree,
            "tp_degree": plan.layout.tp_degree,
            "pp_degree": plan.layout.pp_degree,
            "sharding_degree": plan.layout.sharding_degree,
        },
    }
    return Trainer(args, plan.model_config, model, topology, plan.batch, train_ds, valid_ds, test_ds, run_config)


def _evaluate_only(trainer, args: Arguments) -> None:
    if args.training.do_eval and trainer.valid_dataset is not None:
        logger.info("eval loss %.4f", trainer.evaluate(trainer.valid_dataset, "valid"))
    if args.training.do_predict and trainer.test_dataset is not None:
        logger.info("test loss %.4f", trainer.evaluate(trainer.test_dataset, "test"))


def _load_pretrained(model, directory: str) -> None:
    """Load Paddle-format weights (model_state.pdparams) from a local model directory."""
    import paddle

    path = os.path.join(directory, "model_state.pdparams")
    if not os.path.isfile(path):
        raise ConfigError(f"continue_training: {path} not found; the directory must hold model_state.pdparams.")
    state = paddle.load(path)
    expected = model.state_dict()
    for name, tensor in expected.items():
        if name not in state:
            raise ConfigError(f"continue_training: {path} has no tensor '{name}'.")
        if list(state[name].shape) != list(tensor.shape):
            raise ConfigError(
                f"continue_training: tensor '{name}' in {path} has shape {list(state[name].shape)}, "
                f"the model expects {list(tensor.shape)}."
            )
    model.set_state_dict(state)
    logger.info("loaded weights from %s", path)


def _ignored_reason(key: str) -> str:
    from fleetlm.arguments import IGNORED_KEYS

    return IGNORED_KEYS[key]


def _gpu_build() -> bool:
    import paddle

    return paddle.is_compiled_with_cuda()


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(format_help())
        return 0
    try:
        args = parse_arguments(argv)
    except ConfigError as e:
        return _fail(str(e), EXIT_CONFIG)
    return run(args)
