"""The demo pipeline end to end on the bundled Shakespeare plays: tokenizer, token file, launcher run."""

import json
import os
import subprocess
import sys

import pytest
from run_util import REPO_ROOT, describe, run_pretrain, train_records

DEMO_CONFIG = os.path.join(REPO_ROOT, "llama", "pretrain_llama-15m-shakespeare-demo.json")
PLAYS = os.path.join(REPO_ROOT, "examples", "data", "shakespeare")


def run_tool(*args):
    result = subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    run_tool("data_tools/train_tokenizer.py", "--input_path", PLAYS, "--vocab_size", "1024",
             "--output_prefix", str(root / "spm"))
    run_tool("data_tools/create_pretraining_data.py", "--input_path", PLAYS, "--tokenizer_name_or_path",
             str(root / "spm.model"), "--append_eos", "--workers", "2", "--output_prefix", str(root / "plays"))
    return root


def test_demo_config_trains_through_launcher(demo_data):
    output_dir = demo_data / "out"
    overrides = [
        "--tokenizer_name_or_path", str(demo_data / "spm.model"), "--input_dir", str(demo_data / "plays"),
        "--output_dir", str(output_dir), "--vocab_size", "1024", "--num_hidden_layers", "2", "--hidden_size", "64",
        "--intermediate_size", "128", "--num_attention_heads", "4", "--max_seq_length", "64",
        "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4", "--learning_rate", "0.005",
        "--warmup_steps", "2", "--max_steps", "8", "--logging_steps", "2", "--eval_steps", "4", "--eval_iters", "2",
        "--save_steps", "4", "--disable_tqdm", "true",
    ]
    result = run_pretrain([DEMO_CONFIG, *overrides], nproc=2, log_dir=str(demo_data / "log"))
    assert result.returncode == 0, describe(result)

    records = train_records(str(output_dir))
    assert [r["step"] for r in records] == [2, 4, 6, 8]
    assert records[-1]["loss"] < records[0]["loss"]
    for record in records:
        assert record["tokens_per_s"] > 0
        assert record["tokens_per_card_per_s"] == pytest.approx(record["tokens_per_s"] / 2)
        assert record["peak_memory_gib"] > 0
    with open(output_dir / "metrics.jsonl") as f:
        evals = [r for r in map(json.loads, f) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [4, 8]
    assert sorted(os.listdir(output_dir)) == [".fleetlm.lock", "checkpoint-4", "checkpoint-8", "metrics.jsonl"]
    # The kernel choice is logged with the reason: this CPU build has no fused kernels.
    assert "attention kernel: plain (use_flash_attention requested, but this Paddle build has no CUDA)" in result.logs
