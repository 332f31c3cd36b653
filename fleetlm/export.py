"""Export a fleetlm checkpoint as Hugging Face-layout safetensors plus config.json.

Usage: ``python -m fleetlm.export CHECKPOINT_DIR OUT_DIR [--overwrite]``

CHECKPOINT_DIR is a ``checkpoint-STEP`` directory written by run_pretrain.py in any parallel layout:
config.json with the run's arguments and architecture, and model_state.pdparams from one process
or the per-rank model_state.tp*_pp*[_sd*].pdparams files of tensor-parallel, pipeline-parallel and
sharding-stage-3 runs, which are joined into whole tensors first. Only config.json and the model
files are read, so optimizer and RNG files may be deleted. OUT_DIR receives ``model.safetensors``
(float32, PyTorch [out, in] Linear layout, fused projections re-fused where the family's
checkpoints fuse them) and the family's ``config.json``. LLaMA, GPT-2/GPT-3, OPT, BLOOM and Qwen
(written as transformers' qwen2) load with ``transformers.AutoModelForCausalLM`` without remote
code; Baichuan and ChatGLM use the names their own modeling code reads. GLM-130B has no Hugging
Face layout and is rejected.

OUT_DIR is rejected when it is, contains or lies inside a fleetlm checkpoint or a run's output_dir,
and when it already contains config.json or weight files, unless ``--overwrite`` is given. With
``--overwrite`` the weight files the export does not write (shards, index files, pytorch_model*.bin, model_state*.pdparams)
are deleted, so no loader finds the old weights beside the new ones. The files are written into a
hidden directory next to OUT_DIR first (``.NAME.export-*.tmp``, left behind only when the process is
killed) and then renamed into place.
"""

import argparse
import json
import os
import re
import shutil
import sys
import uuid
from typing import Any, Dict, List, Optional

import numpy as np

from fleetlm.arguments import ConfigError
from fleetlm.models.config import ModelConfig, config_from_json
from fleetlm.utils.log import get_logger

# Not __name__, which is "__main__" under ``python -m fleetlm.export``.
logger = get_logger("fleetlm.export")

WRITTEN_FILES = ("model.safetensors", "config.json")

# Files in OUT_DIR that a loader may read as a model's config or weights: the Hugging Face and
# PaddleNLP single files, their index files and numbered shards.
_MODEL_FILE = re.compile(
    r"^(config\.json"
    r"|model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json"
    r"|pytorch_model(-\d+-of-\d+)?\.bin|pytorch_model\.bin\.index\.json"
    r"|model_state(-\d+-of-\d+)?\.pdparams|model_state\.pdparams\.index\.json)$"
)
# Files that only a fleetlm checkpoint has. A directory with one of them is never written to.
_CHECKPOINT_FILE = re.compile(
    r"^(trainer_state\.json|model_state\.tp\d+_pp\d+(_sd\d+)?\.pdparams|optimizer\..+\.pdopt|rng_state_rank\d+\.pkl)$"
)
# Names of checkpoint directories that resume and checkpoint rotation read, rename or delete.
_CHECKPOINT_NAME = re.compile(r"^checkpoint-\d+(\.tmp|\.deleting|\.abandoned[-\w]*)?$")


# ---- CHECKPOINT_DIR ----


def _check_checkpoint_dir(checkpoint_dir: str) -> None:
    """Raise ConfigError saying what CHECKPOINT_DIR is when it is not a directory with config.json."""
    from fleetlm.trainer.checkpoint import latest_checkpoint

    if not os.path.exists(checkpoint_dir):
        raise ConfigError(
            f"CHECKPOINT_DIR '{checkpoint_dir}' does not exist; pass a checkpoint-STEP directory written by "
            "run_pretrain.py."
        )
    if not os.path.isdir(checkpoint_dir):
        raise ConfigError(
            f"CHECKPOINT_DIR '{checkpoint_dir}' is a file, not a directory; pass a checkpoint-STEP directory "
            "written by run_pretrain.py."
        )
    if os.path.isfile(os.path.join(checkpoint_dir, "config.json")):
        return
    newest = latest_checkpoint(checkpoint_dir)
    if newest is not None:
        raise ConfigError(
            f"CHECKPOINT_DIR '{checkpoint_dir}' is a run's output_dir, not a checkpoint; pass one of its "
            f"checkpoint-STEP directories, e.g. the newest: {newest}"
        )
    raise ConfigError(
        f"CHECKPOINT_DIR '{checkpoint_dir}' has no config.json; pass a checkpoint-STEP directory written by "
        "run_pretrain.py."
    )


def _is_hf_export(checkpoint_dir: str, values: Dict[str, Any]) -> bool:
    """Return True for a directory in Hugging Face layout: its own config.json and no fleetlm model file."""
    from fleetlm.models.hf_configs import HF_MODEL_TYPES

    if "arguments" in values or "norm_type" in values:
        return False  # a fleetlm checkpoint's config.json, or fleetlm's own architecture file
    if "architectures" not in values and values.get("model_type") not in HF_MODEL_TYPES:
        return False
    return not any(name.startswith("model_state") for name in os.listdir(checkpoint_dir))


def read_checkpoint(checkpoint_dir: str):
    """Return (ModelConfig, {name: float32 array in Paddle layout}) of a fleetlm checkpoint directory."""
    from fleetlm.models.weights import read_weights

    _check_checkpoint_dir(checkpoint_dir)
    config_path = os.path.join(checkpoint_dir, "config.json")
    try:
        with open(config_path, encoding="utf-8") as f:
            values = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(
            f"{config_path} is not valid JSON ({e}); pass a checkpoint-STEP directory whose config.json "
            "run_pretrain.py wrote."
        ) from None
    if not isinstance(values, dict):
        raise ConfigError(
            f"{config_path} contains a JSON {type(values).__name__}, not an object; pass a checkpoint-STEP directory "
            "whose config.json run_pretrain.py wrote."
        )
    if _is_hf_export(checkpoint_dir, values):
        raise ConfigError(
            f"CHECKPOINT_DIR '{checkpoint_dir}' is already in Hugging Face layout (config.json of model_type "
            f"'{values.get('model_type')}' and no fleetlm model_state file); load it with transformers or "
            "--model_name_or_path, or pass a checkpoint-STEP directory written by run_pretrain.py to export."
        )
    config = config_from_json(values, config_path)
    tensors, _ = read_weights(checkpoint_dir)
    return config, {name: np.asarray(array, dtype=np.float32) for name, array in tensors.items()}


# ---- OUT_DIR ----


def _nearest_existing(path: str) -> str:
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def _enclosing_checkpoint(path: str) -> Optional[str]:
    """Return the fleetlm checkpoint directory (one with trainer_state.json) that is or contains ``path``."""
    from fleetlm.trainer.checkpoint import TRAINER_STATE

    while True:
        if os.path.isfile(os.path.join(path, TRAINER_STATE)):
            return path
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent


def _has_checkpoint_dirs(path: str) -> bool:
    """Return True for a run's output_dir: it holds checkpoint-STEP directories, or the lock of a run (one that
    has not saved yet, or saves none)."""
    if not os.path.isdir(path):
        return False
    names = os.listdir(path)
    return ".fleetlm.lock" in names or any(_CHECKPOINT_NAME.match(name) for name in names)


def _check_out_dir(out_dir: str, checkpoint_dir: str) -> List[str]:
    """Return the config and weight files already in OUT_DIR, after checking that it may receive the export.

    Raises ConfigError when OUT_DIR is a file or lies under one. It also raises when the export would
    replace a fleetlm checkpoint's files, or when resume or checkpoint rotation would rename or delete it.
    """
    target = os.path.realpath(out_dir)
    suggestion = os.path.abspath(checkpoint_dir) + "-hf"
    existing = _nearest_existing(target)
    if existing == target and not os.path.isdir(target):
        raise ConfigError(f"OUT_DIR '{out_dir}' is a file; pass a directory path (it is created if missing).")
    if not os.path.isdir(existing):
        raise ConfigError(
            f"OUT_DIR '{out_dir}' lies under '{existing}', which is a file; pass a path whose parents are directories."
        )

    if target == os.path.realpath(checkpoint_dir):
        raise ConfigError(
            f"OUT_DIR '{out_dir}' is the checkpoint being exported, and the export would replace its config.json; "
            f"pass a new directory, e.g. {suggestion}"
        )
    checkpoint = _enclosing_checkpoint(existing)
    if checkpoint is not None:
        raise ConfigError(
            f"OUT_DIR '{out_dir}' is inside the fleetlm checkpoint {checkpoint}, whose files the export would "
            f"replace or whose deletion would take the export with it; pass a new directory, e.g. {suggestion}"
        )
    if _has_checkpoint_dirs(target):
        raise ConfigError(
            f"OUT_DIR '{out_dir}' is a run's output_dir (it contains checkpoint-STEP directories or a run's lock); pass a new "
            f"directory, e.g. {suggestion}"
        )
    if _CHECKPOINT_NAME.match(os.path.basename(target)) and _has_checkpoint_dirs(os.path.dirname(target)):
        raise ConfigError(
            f"OUT_DIR '{out_dir}' has the name of a checkpoint in a run's output_dir, which resume and "
            f"checkpoint rotation rename or delete; pass another name, e.g. {suggestion}"
        )
    if not os.path.isdir(target):
        return []

    names = sorted(os.listdir(target))
    checkpoint_files = [name for name in names if _CHECKPOINT_FILE.match(name)]
    if checkpoint_files:
        raise ConfigError(
            f"OUT_DIR '{out_dir}' contains fleetlm checkpoint files ({', '.join(checkpoint_files[:3])}), which "
            f"export never overwrites; pass a new directory, e.g. {suggestion}"
        )
    stale = {name for name in names if _MODEL_FILE.match(name) and os.path.isfile(os.path.join(target, name))}
    for index in [name for name in stale if name.endswith(".index.json")]:
        stale.update(_listed_shards(target, index))
    return sorted(stale)


def _listed_shards(directory: str, index: str) -> List[str]:
    """Return the shard files in ``directory`` that the weight_map of ``index`` lists (none when unreadable)."""
    try:
        with open(os.path.join(directory, index), encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map")
    except (OSError, ValueError, AttributeError):
        return []
    if not isinstance(weight_map, dict):
        return []
    return [shard for shard in set(weight_map.values())
            if isinstance(shard, str) and os.path.basename(shard) == shard and os.path.isfile(os.path.join(directory, shard))]


def _write_export(out_dir: str, tensors: Dict[str, np.ndarray], hf_config: Dict[str, Any], stale: List[str]) -> str:
    """Write model.safetensors and config.json into OUT_DIR, deleting ``stale`` files; return the safetensors path.

    Both files are written in full into a temporary sibling directory first. A new OUT_DIR is that
    directory renamed, so it appears complete or not at all. In an existing OUT_DIR the stale files
    are deleted and then each new file is renamed into place. A kill between these renames can leave
    the old config.json beside the new weights, but never a partly written file.
    """
    from safetensors.numpy import save_file

    from fleetlm.trainer.checkpoint import fsync_path

    target = os.path.abspath(out_dir)
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(target)}.export-{uuid.uuid4().hex[:8]}.tmp")
    os.mkdir(tmp)
    try:
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(hf_config, f, indent=2, sort_keys=True)
        # safetensors 0.8.0 creates its file readable by the owner only. Give it config.json's mode,
        # which follows the umask.
        os.chmod(os.path.join(tmp, "model.safetensors"), os.stat(os.path.join(tmp, "config.json")).st_mode & 0o777)
        for name in WRITTEN_FILES:
            fsync_path(os.path.join(tmp, name))
        if not os.path.exists(target):
            os.rename(tmp, target)
            fsync_path(parent)
        else:
            for name in stale:
                if name not in WRITTEN_FILES:
                    os.remove(os.path.join(target, name))
            for name in WRITTEN_FILES:
                os.replace(os.path.join(tmp, name), os.path.join(target, name))
            fsync_path(target)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return os.path.join(target, "model.safetensors")


# ---- export ----


def export_checkpoint(checkpoint_dir: str, out_dir: str, overwrite: bool = False) -> str:
    """Write OUT_DIR/model.safetensors and OUT_DIR/config.json; return the safetensors path.

    Raises ConfigError, before anything is written, for a CHECKPOINT_DIR that cannot be exported,
    for an OUT_DIR that is rejected (see the module docstring) and, without ``overwrite``, for an
    OUT_DIR that already contains config.json or weight files.
    """
    from fleetlm.models.hf_configs import config_to_hf
    from fleetlm.models.weights import EXPORT_LAYOUTS, convert_to_hf

    _check_checkpoint_dir(checkpoint_dir)
    stale = _check_out_dir(out_dir, checkpoint_dir)
    if stale and not overwrite:
        raise ConfigError(
            f"OUT_DIR '{out_dir}' already contains {', '.join(stale)}; pass --overwrite to replace them (weight "
            "files the export does not write are deleted), or pass a new or empty directory."
        )

    config: ModelConfig
    config, state = read_checkpoint(checkpoint_dir)
    hf_config = config_to_hf(config)
    tensors = convert_to_hf(state, config)
    try:
        path = _write_export(out_dir, tensors, hf_config, stale)
    except OSError as e:
        detail = f"{e.strerror or e} ({e.filename})" if e.filename else f"{e.strerror or e}"
        raise ConfigError(
            f"failed to write the export to OUT_DIR '{out_dir}': {detail}; check that the directory is writable "
            "and the disk has space."
        ) from None
    replaced = [name for name in stale if name in WRITTEN_FILES]
    deleted = [name for name in stale if name not in WRITTEN_FILES]
    changes = []
    if replaced:
        changes.append(f"replaced {', '.join(replaced)}")
    if deleted:
        changes.append(f"deleted {', '.join(deleted)}")
    if changes:
        logger.warning("--overwrite: %s in %s", " and ".join(changes), out_dir)
    logger.info(
        "exported %d tensors of model_type %s (Hugging Face layout %s) to %s",
        len(tensors), config.model_type, EXPORT_LAYOUTS[config.model_type], out_dir,
    )
    return path


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fleetlm.export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint_dir", help="checkpoint-STEP directory written by run_pretrain.py")
    parser.add_argument("out_dir", help="directory for model.safetensors and config.json (created if missing)")
    parser.add_argument(
        "--overwrite", action="store_true",
        help="replace config.json and model.safetensors already in OUT_DIR and delete its other weight files "
             "(shards, index files, pytorch_model*.bin, model_state*.pdparams); a fleetlm checkpoint is never overwritten",
    )
    args = parser.parse_args(argv)
    try:
        export_checkpoint(args.checkpoint_dir, args.out_dir, overwrite=args.overwrite)
    except ConfigError as e:
        logger.error("%s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
