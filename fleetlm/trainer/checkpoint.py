"""Checkpoints that are either complete or absent, and resume from the newest complete one.

Layout of ``OUTPUT_DIR/checkpoint-STEP/``:
    model_state.pdparams          parameters by structured name, when tp = pp = 1
    model_state.tp*_pp*.pdparams  otherwise one shard per tensor-parallel rank and pipeline stage
    optimizer.tp*_pp*_sd*.pdopt   AdamW moments, beta powers and the LR scheduler state, per shard
                                  (format and resharding: fleetlm.trainer.sharded_checkpoint)
    rng_state_rank{R}.pkl         Python, NumPy and Paddle generator states of global rank R
    trainer_state.json            format version, step, consumed samples, layout, file sizes; written last
    config.json                   the resolved arguments and model architecture of the run

Atomicity: every rank writes into ``checkpoint-STEP.tmp``; after a barrier rank 0 writes
trainer_state.json, fsyncs, and renames the directory to ``checkpoint-STEP``. A rename within one
file system is atomic, so a process killed at any moment leaves either the previous set of
complete checkpoints or the new one, never a half-written ``checkpoint-STEP``. Leftover ``.tmp``
directories are removed at the next start. Old checkpoints beyond ``save_total_limit`` are first
renamed to ``.deleting`` and then removed, so a kill during deletion cannot leave a damaged
checkpoint under a complete name. Rotation counts only checkpoints up to the step just saved.

Resuming from step N sets aside every checkpoint of output_dir above N: they belong to the run
that went on from N (an older checkpoint chosen by hand, or newer ones skipped as damaged). They
are renamed to ``checkpoint-STEP.abandoned-TIME`` (UTC time of the resume, the same for all of
them), which neither a resume nor rotation reads.

trainer_state.json is a JSON object with these keys:
    format_version    2 (this fleetlm writes 2 and reads 1 and 2)
    step              optimizer steps taken; equals STEP of the directory name checkpoint-STEP
    consumed_samples  training samples read so far
    layout            the parallel degrees, world size, sharding stage and related options
    files             {file name: size in bytes} for every other file of the directory. Required in
                      version 2. Version 1 checkpoints may lack it, and for them a resume only
                      checks that a model and an optimizer file are present.

A complete checkpoint can still be damaged later (a truncated or partial copy, a failing disk, an
edited trainer_state.json). A resume compares the file sizes and the step with the directory
name first. With ``resume_from_checkpoint=true`` a checkpoint that fails those checks is skipped
for the next older one, with a warning that names the file.
"""

import json
import os
import pickle
import random
import re
import shutil
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import paddle

from fleetlm.utils.log import get_logger, process_rank

logger = get_logger(__name__)

# Version 2 requires the "files" size list in trainer_state.json, which version 1 may lack.
FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (1, 2)
_NAME = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: the message names its path and what is wrong."""


class DamagedCheckpointError(CheckpointError):
    """A file of a complete checkpoint cannot be read: truncated, overwritten or unreadable."""

    def __init__(self, checkpoint: str, file_name: str, reason: str):
        self.checkpoint = checkpoint
        self.file_name = file_name
        self.reason = reason
        super().__init__(
            f"cannot load checkpoint {checkpoint}: {file_name} is damaged ({reason}). Resume from an older "
            "checkpoint with --resume_from_checkpoint OUTPUT_DIR/checkpoint-STEP, or with "
            "--resume_from_checkpoint true, which skips damaged checkpoints."
        )


@dataclass
class TrainerState:
    """Training position: the optimizer steps taken, the samples consumed and the layout that took them."""

    step: int
    consumed_samples: int
    layout: Dict[str, int]
    # Saved size in bytes of every other file in the checkpoint. None for a version 1 checkpoint without the list.
    files: Optional[Dict[str, int]] = None


def fsync_path(path: str) -> None:
    """Flush a file or a directory (its entries: renames, new names) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _checkpoint_dirs(output_dir: str, complete: bool) -> List[Tuple[int, str]]:
    """List (step, path) of the ``checkpoint-STEP`` directories with (complete) or without trainer_state.json, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = _NAME.match(name)
        path = os.path.join(output_dir, name)
        if match and os.path.isdir(path) and os.path.isfile(os.path.join(path, TRAINER_STATE)) == complete:
            found.append((int(match.group(1)), path))
    return sorted(found)


def list_checkpoints(output_dir: str) -> List[Tuple[int, str]]:
    """Return (step, path) of every complete checkpoint in output_dir, oldest first."""
    return _checkpoint_dirs(output_dir, complete=True)


def _unfinished_checkpoints(output_dir: str) -> List[Tuple[int, str]]:
    """Return (step, path) of ``checkpoint-STEP`` directories without trainer_state.json, oldest first.

    A save writes trainer_state.json before the rename to the final name, so such a directory lost
    the file afterwards (deleted by hand, or a copy that stopped early).
    """
    return _checkpoint_dirs(output_dir, complete=False)


def check_resume_into(checkpoint: str, output_dir: str) -> None:
    """Raise CheckpointError when a checkpoint from another directory would resume into an output_dir holding checkpoints.

    Those checkpoints belong to another run: resuming would set aside or rotate them away and
    continue that run's metrics.jsonl with this one's steps.
    """
    source_dir = os.path.realpath(os.path.dirname(os.path.normpath(checkpoint)))
    if source_dir == os.path.realpath(output_dir) or os.path.realpath(checkpoint) == os.path.realpath(output_dir):
        return
    existing = list_checkpoints(output_dir) + _unfinished_checkpoints(output_dir)
    if existing:
        raise CheckpointError(
            f"resume_from_checkpoint='{checkpoint}' is outside output_dir='{output_dir}', which contains checkpoints "
            f"of another run ({', '.join(os.path.basename(p) for _, p in sorted(existing))}); resuming would mix the "
            "two runs. Choose a new output_dir, or resume from output_dir's own checkpoints."
        )


def set_aside_newer(output_dir: str, step: int, resumed_from: str) -> List[str]:
    """Rename checkpoints of ``output_dir`` above ``step`` to ``checkpoint-N.abandoned-TIME``; return the new paths.

    Called (rank 0) after resuming from step ``step``: the newer checkpoints belong to the run that
    was abandoned there. Left in place, a later ``resume_from_checkpoint true`` would continue that
    run instead of this one, and rotation would count them. Nothing is deleted.
    """
    moved = []
    newer = [(n, path) for n, path in list_checkpoints(output_dir) + _unfinished_checkpoints(output_dir) if n > step]
    # One suffix for the whole abandoned branch, so its checkpoints stay recognisable as one run.
    tag = time.strftime("abandoned-%Y%m%dT%H%M%S", time.gmtime())
    suffix, counter = tag, 1
    while any(os.path.exists(f"{path}.{suffix}") for _, path in newer):
        counter += 1
        suffix = f"{tag}-{counter}"
    for _, path in sorted(newer):
        target = f"{path}.{suffix}"
        os.rename(path, target)
        moved.append(target)
    if moved:
        fsync_path(output_dir)
        logger.warning(
            "resumed from %s (step %d), so the newer checkpoints of the run that went on from there were renamed, "
            "to keep a later --resume_from_checkpoint true from continuing that run: %s. Delete them when they "
            "are no longer needed.", resumed_from, step, ", ".join(os.path.basename(p) for p in moved),
        )
    return moved


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
        _fsync_file(os.path.join(tmp, "config.json"))
        trainer_state = {
            "format_version": FORMAT_VERSION,
            "step": state.step,
            "consumed_samples": state.consumed_samples,
            "layout": state.layout,
            # Every rank's files are written and synced (barrier above): their sizes let a resume
            # find a truncated or missing file without reading the files.
            "files": {name: os.path.getsize(os.path.join(tmp, name)) for name in sorted(os.listdir(tmp))},
        }
        with open(os.path.join(tmp, TRAINER_STATE), "w", encoding="utf-8") as f:
            json.dump(trainer_state, f, indent=2)
        _fsync_file(os.path.join(tmp, TRAINER_STATE))
        fsync_path(tmp)
        _commit(tmp, final)
        fsync_path(output_dir)
        logger.info("saved checkpoint %s (step %d, %d samples consumed)", final, state.step, state.consumed_samples)
        if save_total_limit > 0:
            _rotate(output_dir, save_total_limit, state.step)
    barrier()
    return final


def _commit(tmp: str, final: str) -> None:
    """Rename the finished temporary directory to its final name (the moment the checkpoint exists)."""
    if os.path.exists(final):
        # A checkpoint of the same step from an earlier attempt: replace it, old copy out of the way first.
        logger.warning("replacing %s, written by an earlier run that reached this step", final)
        os.rename(final, final + ".deleting")
        shutil.rmtree(final + ".deleting")
    os.rename(tmp, final)


def _rotate(output_dir: str, keep: int, saved_step: int) -> None:
    """Remove all but the ``keep`` newest checkpoints up to ``saved_step``; never the one just saved."""
    # Checkpoints after saved_step come from an earlier attempt that got further, typically one that
    # resume skipped as damaged. Counting them could delete every good checkpoint and keep only them.
    earlier = [(step, path) for step, path in list_checkpoints(output_dir) if step <= saved_step]
    for _, path in earlier[:-keep]:
        doomed = path + ".deleting"
        os.rename(path, doomed)
        shutil.rmtree(doomed)
        logger.info("removed old checkpoint %s (save_total_limit=%d)", path, keep)


def read_trainer_state(path: str) -> TrainerState:
    """Read and check trainer_state.json of a checkpoint directory.

    Raises CheckpointError when the file is missing or has an unknown format version, and
    DamagedCheckpointError when it cannot be parsed, a value is invalid, or its step differs
    from the STEP of a directory named checkpoint-STEP.
    """
    state_path = os.path.join(path, TRAINER_STATE)
    if not os.path.isfile(state_path):
        raise CheckpointError(f"{path} is not a complete checkpoint: {TRAINER_STATE} is missing.")
    try:
        with open(state_path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, UnicodeDecodeError) as e:
        raise DamagedCheckpointError(path, TRAINER_STATE, f"{type(e).__name__}: {e}") from None
    except json.JSONDecodeError as e:
        raise DamagedCheckpointError(path, TRAINER_STATE, f"not valid JSON: {e.msg}") from None
    if not isinstance(raw, dict):
        raise DamagedCheckpointError(path, TRAINER_STATE, f"expected a JSON object, found {type(raw).__name__}")
    version = raw.get("format_version")
    if isinstance(version, bool) or version not in READABLE_FORMAT_VERSIONS:
        readable = " and ".join(str(v) for v in READABLE_FORMAT_VERSIONS)
        raise CheckpointError(
            f"{state_path} has format_version {version!r}; this fleetlm reads versions {readable}."
        )
    for key in ("step", "consumed_samples"):
        value = raw.get(key)
        if not _is_size(value):
            raise DamagedCheckpointError(path, TRAINER_STATE, f"it has {key}={value!r}, not a non-negative integer")
    match = _NAME.match(os.path.basename(os.path.normpath(path)))
    if match and int(match.group(1)) != raw["step"]:
        raise DamagedCheckpointError(
            path, TRAINER_STATE,
            f"it has step={raw['step']}, but the directory name says step {int(match.group(1))}",
        )
    if not isinstance(raw.get("layout"), dict):
        raise DamagedCheckpointError(path, TRAINER_STATE, "it has no layout object")
    return TrainerState(step=raw["step"], consumed_samples=raw["consumed_samples"], layout=raw["layout"],
                        files=_read_file_sizes(path, raw, version))


def _is_size(value: Any) -> bool:
    # JSON true and false load as bool, a subclass of int.
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _read_file_sizes(path: str, raw: Dict[str, Any], version: int) -> Optional[Dict[str, int]]:
    """Return the checked "files" entry of a parsed trainer_state.json (None: version 1 without it)."""
    if "files" not in raw and version == 1:
        return None
    sizes = raw.get("files")
    if not isinstance(sizes, dict):
        found = "no files entry" if "files" not in raw else f"files={sizes!r}"
        raise DamagedCheckpointError(
            path, TRAINER_STATE,
            f"it has {found}, but format version {version} needs an object of file names and sizes in bytes",
        )
    for name, size in sorted(sizes.items()):
        # Only plain names inside the checkpoint directory: an edited entry must not make a
        # resume stat files elsewhere.
        if name in ("", ".") or ".." in name or "/" in name or "\\" in name or os.path.isabs(name):
            raise DamagedCheckpointError(
                path, TRAINER_STATE, f"its files list names {name!r}, which is not a file name inside the checkpoint"
            )
        if not _is_size(size):
            raise DamagedCheckpointError(
                path, TRAINER_STATE, f"its files list gives {name} the size {size!r}, not a non-negative integer"
            )
    return sizes


def verify_file_sizes(path: str, only: Optional[Callable[[str], bool]] = None) -> None:
    """Check that every file listed in the checkpoint's trainer_state.json has the size it had when saved.

    ``only(name)``, when given, picks the files to check (export needs the model files alone), and a
    checkpoint without a size list passes.

    Raises DamagedCheckpointError for an unreadable or invalid trainer_state.json, or naming the
    first missing or resized file, in name order, so every rank that reads the same files reaches
    the same verdict. Only sizes are compared (a stat per file, no reads), which finds truncated
    copies and missing shards at any model size. A file damaged inside at its saved size fails
    later, when it is loaded. Version 1 checkpoints saved before sizes were recorded only need
    their model and optimizer files.
    """
    sizes = read_trainer_state(path).files
    if sizes is None and only is not None:
        return
    if sizes is None:
        names = os.listdir(path)
        for kind, prefix in (("model", "model_state"), ("optimizer", "optimizer")):
            if not any(name.startswith(prefix) for name in names):
                raise DamagedCheckpointError(path, f"{prefix}*", f"no {kind} file in the checkpoint")
        return
    for name, size in sorted(sizes.items()):
        if only is not None and not only(name):
            continue
        try:
            actual = os.path.getsize(os.path.join(path, name))
        except OSError as e:
            raise DamagedCheckpointError(path, name, f"{type(e).__name__}: {e.strerror}") from None
        if actual != size:
            raise DamagedCheckpointError(path, name, f"{actual} bytes, but {size} were saved")


def load_rng_state(path: str, rank: int) -> Optional[Dict[str, Any]]:
    full = os.path.join(path, f"rng_state_rank{rank}.pkl")
    if not os.path.isfile(full):
        return None
    with open(full, "rb") as f:
        return pickle.load(f)


def resolve_resume_path(
    resume_from_checkpoint: Optional[str],
    output_dir: str,
    verify: Optional[Callable[[str], Any]] = None,
) -> Optional[str]:
    """Turn the resume_from_checkpoint argument into a checkpoint directory, or None to start fresh.

    ``verify(path)`` checks the checkpoint's files and raises DamagedCheckpointError for one that
    cannot be read. 'true' means the newest complete checkpoint in output_dir that passes
    ``verify``; a damaged newer one is skipped with a warning on rank 0. When there
    is no checkpoint, the run starts fresh and logs it. A path must be a complete checkpoint, or a
    directory that contains some, and is never replaced by another, so damage in it is an error.
    The choice depends only on the files, so every rank that reads the same files makes it.
    """
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint.lower() == "true":
        return _newest_readable(output_dir, verify)
    if not os.path.isdir(resume_from_checkpoint):
        raise CheckpointError(
            f"resume_from_checkpoint='{resume_from_checkpoint}' is not a directory; pass a checkpoint-STEP "
            "directory, an output_dir that holds some, or true."
        )
    if os.path.isfile(os.path.join(resume_from_checkpoint, TRAINER_STATE)):
        path = resume_from_checkpoint
    elif _NAME.match(os.path.basename(os.path.normpath(resume_from_checkpoint))):
        raise CheckpointError(
            f"resume_from_checkpoint='{resume_from_checkpoint}' has no {TRAINER_STATE}, which every complete "
            "checkpoint has: the file was deleted or the copy is incomplete. Resume from another checkpoint-STEP "
            "directory, or restore the checkpoint from a copy."
        )
    else:
        path = latest_checkpoint(resume_from_checkpoint)
        if path is None:
            raise CheckpointError(
                f"resume_from_checkpoint='{resume_from_checkpoint}' contains no complete checkpoint (a checkpoint-STEP "
                f"directory with {TRAINER_STATE}); pass a checkpoint-STEP directory, or true to resume from output_dir."
            )
    if verify is not None:
        verify(path)
    return path


def _newest_readable(output_dir: str, verify: Optional[Callable[[str], Any]]) -> Optional[str]:
    """Return the newest complete checkpoint in output_dir that ``verify`` accepts, None when there is none."""
    checkpoints = list_checkpoints(output_dir)
    if not checkpoints:
        logger.info("resume_from_checkpoint=true: no complete checkpoint in %s, starting from step 0", output_dir)
        return None
    newest_step = checkpoints[-1][0]
    if process_rank() == 0:
        for step, path in _unfinished_checkpoints(output_dir):
            if step > newest_step:
                logger.warning("resume_from_checkpoint=true: skipping %s, which has no %s (deleted, or an incomplete "
                               "copy).", path, TRAINER_STATE)
    damaged: List[DamagedCheckpointError] = []
    for _, path in reversed(checkpoints):
        try:
            if verify is not None:
                verify(path)
        except DamagedCheckpointError as e:
            damaged.append(e)
            continue
        if process_rank() == 0:
            for error in damaged:
                logger.warning(
                    "resume_from_checkpoint=true: skipping damaged checkpoint %s (%s: %s); resuming from %s "
                    "instead.",
                    error.checkpoint, error.file_name, error.reason, path,
                )
        return path
    listing = "; ".join(f"{e.checkpoint}: {e.file_name} ({e.reason})" for e in damaged)
    raise CheckpointError(
        f"resume_from_checkpoint=true: every complete checkpoint in {output_dir} is damaged ({listing}). "
        "Restore a checkpoint from a copy, or start a new run in another output_dir."
    )
