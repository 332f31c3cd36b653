"""Export a fleetlm checkpoint as Hugging Face-layout safetensors plus config.json.

Usage: ``python -m fleetlm.export CHECKPOINT_DIR OUT_DIR``

CHECKPOINT_DIR is a ``checkpoint-STEP`` directory written by run_pretrain.py in any parallel layout:
config.json with the run's arguments and architecture, and model_state.pdparams from one process
or the per-rank model_state.tp*_pp*[_sd*].pdparams files of tensor-parallel, pipeline-parallel and
sharding-stage-3 runs, which are joined into whole tensors first. OUT_DIR receives ``model.safetensors``
(float32, PyTorch [out, in] Linear layout, fused projections re-fused where the family's
checkpoints fuse them) and the family's ``config.json``. LLaMA, GPT-2/GPT-3, OPT, BLOOM and Qwen
(written as transformers' qwen2) load with ``transformers.AutoModelForCausalLM`` without remote
code; Baichuan and ChatGLM use the names their own modeling code reads. GLM-130B has no Hugging
Face layout and is rejected.
"""

import argparse
import json
import os
import sys
from typing import List, Optional

import numpy as np

from fleetlm.arguments import ConfigError
from fleetlm.models.config import ModelConfig, config_from_json
from fleetlm.utils.log import get_logger

logger = get_logger(__name__)


def read_checkpoint(checkpoint_dir: str):
    """Return (ModelConfig, {name: float32 array in Paddle layout}) of a fleetlm checkpoint directory."""
    from fleetlm.models.weights import read_weights

    config_path = os.path.join(checkpoint_dir, "config.json")
    if not os.path.isfile(config_path):
        raise ConfigError(f"{checkpoint_dir} has no config.json; pass a checkpoint-STEP directory of run_pretrain.py.")
    with open(config_path, encoding="utf-8") as f:
        config = config_from_json(json.load(f), config_path)
    tensors, _ = read_weights(checkpoint_dir)
    return config, {name: np.asarray(array, dtype=np.float32) for name, array in tensors.items()}


def export_checkpoint(checkpoint_dir: str, out_dir: str) -> str:
    """Write OUT_DIR/model.safetensors and OUT_DIR/config.json; return the safetensors path."""
    from safetensors.numpy import save_file

    from fleetlm.models.hf_configs import config_to_hf
    from fleetlm.models.weights import convert_to_hf

    config: ModelConfig
    config, state = read_checkpoint(checkpoint_dir)
    hf_config = config_to_hf(config)
    tensors = convert_to_hf(state, config)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "model.safetensors")
    save_file(tensors, path, metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf_config, f, indent=2, sort_keys=True)
    logger.info("exported %d tensors of a %s model to %s", len(tensors), config.model_type, out_dir)
    return path


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fleetlm.export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint_dir", help="checkpoint-STEP directory written by run_pretrain.py")
    parser.add_argument("out_dir", help="directory for model.safetensors and config.json (created if missing)")
    args = parser.parse_args(argv)
    try:
        export_checkpoint(args.checkpoint_dir, args.out_dir)
    except ConfigError as e:
        logger.error("%s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
