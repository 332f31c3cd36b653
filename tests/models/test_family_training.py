"""Every family's debug argument file trains through run_pretrain.py on CPU, alone and with 2-process data parallel.

Single-process runs use micro-batch 2 x accumulation 2; the 2-process runs use micro-batch 1 x
accumulation 2 on each rank, the same 4 samples per step, so their losses must equal the
single-process losses.
"""

import math
import os

import numpy as np
import pytest
from run_util import describe, run_pretrain, train_records

from test_configs import REPO_ROOT

DEBUG_FILES = [
    "llama/pretrain_llama-debug.json",
    "llama/pretrain_baichuan2-debug.json",
    "qwen/pretrain_qwen-debug.json",
    "chatglm/pretrain_chatglm2-debug.json",
    "gpt-3/pretrain_gpt3-debug.json",
    "opt/pretrain_opt-debug.json",
    "bloom/pretrain_bloom-debug.json",
    "chatglm/pretrain_chatglm-debug.json",
    "glm/pretrain_glm-debug.json",
]
STEPS = 3


def debug_args(path, tokens, output_dir, micro_batch):
    return [
        os.path.join(REPO_ROOT, path), "--input_dir", tokens, "--output_dir", output_dir,
        "--max_steps", str(STEPS), "--per_device_train_batch_size", str(micro_batch),
        "--gradient_accumulation_steps", "2", "--do_eval", "false", "--save_steps", "0", "--max_seq_length", "32",
    ]


@pytest.fixture(scope="module")
def single_runs(pattern_tokens, tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    outputs = {}
    for path in DEBUG_FILES:
        output_dir = str(root / os.path.basename(path).replace(".json", ""))
        result = run_pretrain(debug_args(path, pattern_tokens, output_dir, micro_batch=2), timeout=180)
        assert result.returncode == 0, f"{path}\n{result.stdout[-5000:]}"
        outputs[path] = output_dir
    return outputs


@pytest.mark.parametrize("path", DEBUG_FILES)
def test_debug_file_trains(path, single_runs):
    records = train_records(single_runs[path])
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    losses = [r["loss"] for r in records]
    assert all(math.isfinite(loss) for loss in losses)
    # A random model starts near the uniform loss over the 512-token vocabulary.
    assert abs(losses[0] - math.log(512)) < 1.0


@pytest.mark.parametrize("path", DEBUG_FILES)
def test_data_parallel_matches_single_process(path, single_runs, pattern_tokens, tmp_path):
    output_dir = str(tmp_path / "dp2")
    result = run_pretrain(debug_args(path, pattern_tokens, output_dir, micro_batch=1), nproc=2,
                          log_dir=str(tmp_path / "log"), timeout=240)
    assert result.returncode == 0, describe(result)
    expected = [r["loss"] for r in train_records(single_runs[path])]
    np.testing.assert_allclose([r["loss"] for r in train_records(output_dir)], expected, rtol=1e-5)
