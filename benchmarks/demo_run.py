"""Run the demo argument file for a few steps and return its per-step metrics (shared by the benchmarks)."""

import json
import os
import subprocess
import sys
import time
from typing import List, Sequence, Tuple

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIG = os.path.join(REPO_ROOT, "llama", "pretrain_llama-15m-shakespeare-demo.json")


def train_demo(nproc: int, steps: int, output_dir: str, log_dir: str, data_prefix: str, tokenizer: str,
               extra_args: Sequence[str] = ()) -> Tuple[List[dict], float]:
    """Train the demo config on ``nproc`` processes (one thread each); return the step records and wall seconds."""
    args = [
        DEMO_CONFIG, "--max_steps", str(steps), "--logging_steps", "1", "--save_steps", "0", "--do_eval", "false",
        "--output_dir", output_dir, "--input_dir", data_prefix, "--tokenizer_name_or_path", tokenizer,
        "--disable_tqdm", "true", *extra_args,
    ]
    command = [sys.executable]
    if nproc > 1:
        command += ["-m", "paddle.distributed.launch", "--nproc_per_node", str(nproc), "--log_dir", log_dir]
    command += [os.path.join(REPO_ROOT, "run_pretrain.py"), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    start = time.perf_counter()
    subprocess.run(command, cwd=REPO_ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if '"loss"' in line]
    return records, wall
