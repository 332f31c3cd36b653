"""The demo config through the launcher with plain data parallel, tensor parallel and sharding stage 2.

The demo data is built as scripts/run_demo.sh builds it (SentencePiece tokenizer, then .bin/.idx).
Runs are shortened to 2 steps of 2 samples of 64 tokens on a 2-layer model; everything else,
including the fused-kernel switches that fall back on CPU, comes from the demo JSON file.
"""

import json
import math
import os
import subprocess
import sys

import pytest
from run_util import REPO_ROOT, describe, run_pretrain, train_records

DEMO_CONFIG = os.path.join(REPO_ROOT, "llama", "pretrain_llama-15m-shakespeare-demo.json")
PLAYS = os.path.join(REPO_ROOT, "examples", "data", "shakespeare")


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    prefix = str(root / "shakespeare")
    subprocess.run([sys.executable, "data_tools/train_tokenizer.py", "--input_path", PLAYS, "--vocab_size", "4096",
                    "--output_prefix", prefix], cwd=REPO_ROOT, check=True, capture_output=True)
    subprocess.run([sys.executable, "data_tools/create_pretraining_data.py", "--input_path", PLAYS,
                    "--tokenizer_name_or_path", prefix + ".model", "--append_eos", "--workers", "1",
                    "--output_prefix", prefix], cwd=REPO_ROOT, check=True, capture_output=True)
    return prefix


@pytest.mark.parametrize(
    "layout, extra, degrees",
    [
        ("dp2", [], (2, 1, 1)),
        ("tp2", ["--tensor_parallel_degree", "2"], (1, 2, 1)),
        ("stage2", ["--sharding", "stage2"], (1, 1, 2)),
    ],
)
def test_demo_config_runs(demo_data, tmp_path, layout, extra, degrees):
    output_dir = str(tmp_path / layout)
    result = run_pretrain(
        [DEMO_CONFIG, "--input_dir", demo_data, "--tokenizer_name_or_path", demo_data + ".model",
         "--output_dir", output_dir, "--max_steps", "2", "--max_seq_length", "64", "--num_hidden_layers", "2",
         "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "2", "--eval_iters", "1",
         "--eval_steps", "2", "--save_steps", "2", "--logging_steps", "1", "--warmup_steps", "1",
         "--disable_tqdm", "true", *extra],
        nproc=2, log_dir=str(tmp_path / f"log-{layout}"),
    )
    assert result.returncode == 0, describe(result)
    losses = [r["loss"] for r in train_records(output_dir)]
    assert len(losses) == 2
    assert all(math.isfinite(loss) and 7.0 < loss < 9.0 for loss in losses)  # ln(4096) = 8.3 at the start
    with open(os.path.join(output_dir, "checkpoint-2", "trainer_state.json")) as f:
        layout_saved = json.load(f)["layout"]
    assert (layout_saved["dp_degree"], layout_saved["tp_degree"], layout_saved["sharding_degree"]) == degrees
