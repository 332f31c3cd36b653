"""Training throughput of the demo config: tokens/s, MFU against a measured matmul rate, peak memory.

Runs run_pretrain.py on the demo's Shakespeare data for a fixed number of steps, once per process
count, and prints one table. MFU uses the 6N FLOPs per token that the trainer logs, divided by the
fp32 matmul rate this script measures with Paddle in the same environment (one thread per process,
as paddle.distributed.launch sets it, and the same MKL_DEBUG_CPU_TYPE).

usage: MKL_DEBUG_CPU_TYPE=5 python benchmarks/bench_train.py [--steps 12] [--nproc 1 2]
Build the demo data first with scripts/run_demo.sh (or its tokenizer and preprocessing steps).
"""

import argparse
import os
import subprocess
import sys
import tempfile

from demo_run import DEMO_CONFIG, REPO_ROOT, train_demo


def measure_matmul_gflops(threads: int, size: int = 2048, seconds: float = 3.0) -> float:
    """fp32 matmul rate of Paddle in a fresh process limited to ``threads`` threads, in GFLOP/s."""
    code = (
        "import time, paddle\n"
        f"a = paddle.rand([{size}, {size}]); b = paddle.rand([{size}, {size}])\n"
        "paddle.matmul(a, b)\n"
        "n, t = 0, time.perf_counter()\n"
        f"while time.perf_counter() - t < {seconds}:\n"
        "    c = paddle.matmul(a, b); n += 1\n"
        "float(c[0, 0])\n"
        f"print(2 * {size}**3 * n / (time.perf_counter() - t) / 1e9)\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def run_training(nproc: int, steps: int, workdir: str, data_prefix: str, tokenizer: str) -> dict:
    records, wall = train_demo(nproc, steps, os.path.join(workdir, f"out-{nproc}"),
                               os.path.join(workdir, f"log-{nproc}"), data_prefix, tokenizer)
    # Drop the first two steps: they include kernel selection and allocator warm-up.
    steady = records[2:]
    tokens_per_s = sum(r["tokens_per_s"] for r in steady) / len(steady)
    flops_per_token = records[0]["tflops_per_card"] * 1e12 / records[0]["tokens_per_card_per_s"]
    return {
        "nproc": nproc,
        "tokens_per_s": tokens_per_s,
        "tokens_per_card_per_s": tokens_per_s / nproc,
        "gflops_per_card": tokens_per_s / nproc * flops_per_token / 1e9,
        "peak_memory_gib": max(r["peak_memory_gib"] for r in records),
        "wall_s": wall,
        "last_loss": records[-1]["loss"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run (the first 2 are not timed)")
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2], help="process counts to run")
    parser.add_argument("--data", default=os.path.join(REPO_ROOT, "demo_output", "data", "shakespeare"),
                        help="token file prefix")
    parser.add_argument("--tokenizer", default=os.path.join(REPO_ROOT, "demo_output", "tokenizer", "shakespeare.model"))
    args = parser.parse_args()
    if not os.path.isfile(args.data + ".idx"):
        print(f"{args.data}.idx not found; run scripts/run_demo.sh once to build the demo data", file=sys.stderr)
        return 1

    mkl = os.environ.get("MKL_DEBUG_CPU_TYPE", "unset")
    rate_1 = measure_matmul_gflops(threads=1)
    rate_all = measure_matmul_gflops(threads=os.cpu_count() or 1)
    print(f"Paddle fp32 matmul (2048^3), MKL_DEBUG_CPU_TYPE={mkl}: {rate_1:.1f} GFLOP/s on 1 thread, "
          f"{rate_all:.1f} GFLOP/s on {os.cpu_count()} threads")
    print(f"demo config {os.path.relpath(DEMO_CONFIG, REPO_ROOT)}, {args.steps} steps per run, "
          "MFU = achieved 6N GFLOP/s per process / 1-thread matmul rate")
    print(f"{'processes':>9} {'tokens/s':>9} {'tokens/card/s':>13} {'GFLOP/s/card':>12} {'MFU':>6} "
          f"{'peak mem/proc':>13} {'wall s':>7}")
    with tempfile.TemporaryDirectory(prefix="fleetlm-bench-") as workdir:
        for nproc in args.nproc:
            r = run_training(nproc, args.steps, workdir, args.data, args.tokenizer)
            mfu = r["gflops_per_card"] / rate_1
            print(f"{nproc:>9} {r['tokens_per_s']:>9.0f} {r['tokens_per_card_per_s']:>13.0f} "
                  f"{r['gflops_per_card']:>12.1f} {100 * mfu:>5.1f}% {r['peak_memory_gib']:>10.2f} GiB {r['wall_s']:>7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
