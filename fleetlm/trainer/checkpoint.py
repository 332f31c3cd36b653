"""Checkpoints that are either complete or absent, and resume from the newest complete one.

Layout of ``OUTPUT_DIR/checkpoint-STEP/``:
    model_state.pdparams          parameters by structured name, when tp = pp = 1
    model_state.tp*_pp*.pdparams  otherwise one shard per tensor-parallel rank and pipeline stage
    optimizer.tp*_pp*_sd*.pdopt   AdamW moments, beta powers and the LR scheduler state, per shard
                                  (format and resharding: fleetlm.trainer.sharded_checkpoint)
    rng_state_rank{R}.pkl         Python, NumPy and Paddle generator states of global rank R
    trainer_state.json            format version, step, consumed samples, layout; written last
    config.json                   the resolved arguments and model architecture of the run

Atomicity: every rank writes into ``checkpoint-STEP.tmp``; after a barrier rank 0 writes
trainer_state.json, fsyncs, and renames the directory to ``checkpoint-STEP``. A rename within one
file system is atomic, so a process killed at any moment leaves either the previous set of
complete checkpoints or the new one, never a half-written ``checkpoint-STEP``. Leftover ``.tmp``
directories are removed at the next start. Old checkpoints beyond ``save_total_limit`` are first
renamed to ``.deleting`` and then removed, so a kill during deletion cannot leave a damaged
checkpoint under a complete name.
"""

import json
import os
import pickle
import random
import re
import shutil
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import paddle

from fleetlm.utils.log import get_logger

logger = get_logger(__name__)

FORMAT_VERSION = 1
_NAME = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: the message names its path and what is wrong."""


@dataclass
class TrainerState:
    """Training position: the optimizer steps taken, the samples consumed and the layout that took them."""

    step: int
    consumed_samples: int
    layout: Dict[str, int]


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def list_checkpoints(output_dir: str) -> List[Tuple[int, str]]:
    """Return (step, path) of every complete checkpoint in output_dir, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = _NAME.match(name)
        path = os.path.join(output_dir, name)
        if match and os.path.isfile(os.path.join(path, TRAINER_STATE)):
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir: str) -> Optional[str]:
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1][1] if checkpoints else None


def remove_incomplete(output_dir: str) -> None:
    """Delete ``.tmp`` and ``.deleting`` leftovers of a killed run (rank 0 only, before training)."""
    if not os.path.isdir(output_dir):
        return
    for name in os.listdir(output_dir):
        if name.startswith("checkpoint-") and (name.endswith(".tmp") or name.endswith(".deleting")):
            logger.warning("removing incomplete checkpoint directory %s", os.path.join(output_dir, name))
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


def capture_rng_state() -> Dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "paddle": paddle.get_rng_state()}


def restore_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    paddle.set_rng_state(state["paddle"])


def save_checkpoint(
    output_dir: str,
    state: TrainerState,
    files: Dict[str, Any],
    run_config: Dict[str, Any],
    rank: int,
    barrier: Callable[[], None],
    save_total_limit: int = 0,
) -> str:
    """Write checkpoint-STEP atomically; every rank calls this with the files it owns ({name: object})."""
    final = os.path.join(output_dir, f"checkpoint-{state.step}")
    tmp = final + ".tmp"
    if rank == 0:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(tmp)
    barrier()

    written = []
    for name, content in files.items():
        paddle.save(content, os.path.join(tmp, name))
        written.append(os.path.join(tmp, name))
    rng_path = os.path.join(tmp, f"rng_state_rank{rank}.pkl")
    with open(rng_path, "wb") as f:
        pickle.dump(capture_rng_state(), f)
    written.append(rng_path)
    for path in written:
        _fsync_file(path)
    barrier()

    if rank == 0:
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(run_config, f, indent=2, sort_keys=True)
        trainer_state = {
            "format_version": FORMAT_VERSION,
            "step": state.step,
            "consumed_samples": state.consumed_samples,
            "layout": state.layout,
        }
        with open(os.path.join(tmp, TRAINER_STATE), "w", encoding="utf-8") as f:
            json.dump(trainer_state, f, indent=2)
        _fsync_file(os.path.join(tmp, TRAINER_STATE))
        _fsync_dir(tmp)
        _commit(tmp, final)
        _fsync_dir(output_dir)
        logger.info("saved checkpoint %s (step %d, %d samples consumed)", final, state.step, state.consumed_samples)
        if save_total_limit > 0:
            _rotate(output_dir, save_total_limit)
    barrier()
    return final


def _commit(tmp: str, final: str) -> None:
    """Rename the finished temporary directory to its final name (the moment the checkpoint exists)."""
    if os.path.exists(final):
        # A checkpoint of the same step from an earlier attempt: replace it, old copy out of the way first.
        os.rename(final, final + ".deleting")
        shutil.rmtree(final + ".deleting")
    os.rename(tmp, final)


def _rotate(output_dir: str, keep: int) -> None:
    for _, path in list_checkpoints(output_dir)[:-keep]:
        doomed = path + ".deleting"
        os.rename(path, doomed)
        shutil.rmtree(doomed)
        logger.info("removed old checkpoint %s (save_total_limit=%d)", path, keep)


def read_trainer_state(path: str) -> TrainerState:
    """Read and check trainer_state.json of a checkpoint directory."""
    state_path = os.path.join(path, TRAINER_STATE)
    if not os.path.isfile(state_path):
        raise CheckpointError(f"{path} is not a complete checkpoint: {TRAINER_STATE} is missing.")
    try:
        with open(state_path, encoding="utf-8") as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{state_path} is not valid JSON ({e.msg}); the checkpoint is damaged.") from None
    if raw.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{state_path} has format_version {raw.get('format_version')!r}; this fleetlm reads version {FORMAT_VERSION}."
        )
    for key in ("step", "consumed_samples"):
        value = raw.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise CheckpointError(f"{state_path} has {key}={value!r}, not a non-negative integer; the checkpoint is damaged.")
    if not isinstance(raw.get("layout"), dict):
        raise CheckpointError(f"{state_path} has no layout object; the checkpoint is damaged.")
    return TrainerState(step=raw["step"], consumed_samples=raw["consumed_samples"], layout=raw["layout"])


def load_rng_state(path: str, rank: int) -> Optional[Dict[str, Any]]:
    full = os.path.join(path, f"rng_state_rank{rank}.pkl")
    if not os.path.isfile(full):
        return None
    with open(full, "rb") as f:
        return pickle.load(f)


def resolve_resume_path(resume_from_checkpoint: Optional[str], output_dir: str) -> Optional[str]:
    """Turn the resume_from_checkpoint argument into a checkpoint directory, or None to start fresh.

    'true' means the newest complete checkpoint in output_dir. When there is none, the run starts
    fresh and logs it. A path must be a complete checkpoint or a directory that contains some.
    """
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint.lower() == "true":
        path = latest_checkpoint(output_dir)
        if path is None:
            logger.info("resume_from_checkpoint=true: no complete checkpoint in %s, starting from step 0", output_dir)
        return path
    if not os.path.isdir(resume_from_checkpoint):
        raise CheckpointError(
            f"resume_from_checkpoint='{resume_from_checkpoint}' is not a directory; pass a checkpoint-STEP "
            "directory, an output_dir that holds some, or true."
        )
    if os.path.isfile(os.path.join(resume_from_checkpoint, TRAINER_STATE)):
        return resume_from_checkpoint
    path = latest_checkpoint(resume_from_checkpoint)
    if path is None:
        raise CheckpointError(f"resume_from_checkpoint='{resume_from_checkpoint}' contains no complete checkpoint.")
    return path
