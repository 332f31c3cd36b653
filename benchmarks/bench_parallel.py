"""Training throughput of the demo model in each parallel layout beside the 1-process figure.

Every layout trains the demo config (fleetlm/llama-15m, sequence 256) on the same global batch of
16 samples, so tokens/s compare directly: 1 process (micro-batch 8 x 2 accumulation steps), dp2,
tp2, pp2 (1F1B over 4 micro-batches of 4) and sharding stage2 on 2 processes. Each process runs
one thread (OMP_NUM_THREADS=1, as paddle.distributed.launch sets it); MKL_DEBUG_CPU_TYPE is
passed through (5 selects MKL's AVX2 path on AMD CPUs).

usage: MKL_DEBUG_CPU_TYPE=5 python benchmarks/bench_parallel.py [--steps 8] [--layouts single dp2 tp2 pp2 stage2]
Build the demo data first with scripts/run_demo.sh (or its tokenizer and preprocessing steps).
"""

import argparse
import os
import statistics
import sys
import tempfile

from demo_run import DEMO_CONFIG, REPO_ROOT, train_demo

# name: (processes, arguments); each gives a global batch of 16 samples.
LAYOUTS = {
    "single": (1, ["--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "2"]),
    "dp2": (2, ["--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "1"]),
    "tp2": (2, ["--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "2",
                "--tensor_parallel_degree", "2"]),
    "pp2": (2, ["--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "4",
                "--pipeline_parallel_degree", "2"]),
    "stage2": (2, ["--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "1",
                   "--sharding", "stage2"]),
}


def run_layout(name: str, steps: int, workdir: str, data_prefix: str, tokenizer: str) -> dict:
    nproc, layout_args = LAYOUTS[name]
    records, wall = train_demo(nproc, steps, os.path.join(workdir, name), os.path.join(workdir, f"log-{name}"),
                               data_prefix, tokenizer, layout_args)
    # The first two steps include kernel selection and allocator warm-up; the median resists other jobs.
    steady = records[2:]
    return {
        "processes": nproc,
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
        "peak_memory_gib": max(r["peak_memory_gib"] for r in records),
        "last_loss": records[-1]["loss"],
        "wall_s": wall,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per run (the first 2 are not timed)")
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS), help="layouts to run")
    parser.add_argument("--data", default=os.path.join(REPO_ROOT, "demo_output", "data", "shakespeare"),
                        help="token file prefix")
    parser.add_argument("--tokenizer", default=os.path.join(REPO_ROOT, "demo_output", "tokenizer", "shakespeare.model"))
    args = parser.parse_args()
    if not os.path.isfile(args.data + ".idx"):
        print(f"{args.data}.idx not found; run scripts/run_demo.sh once to build the demo data", file=sys.stderr)
        return 1

    print(f"demo config {os.path.relpath(DEMO_CONFIG, REPO_ROOT)}, global batch 16 x 256 tokens, {args.steps} steps, "
          f"MKL_DEBUG_CPU_TYPE={os.environ.get('MKL_DEBUG_CPU_TYPE', 'unset')}, OMP_NUM_THREADS=1 per process")
    print(f"{'layout':>8} {'processes':>9} {'tokens/s':>9} {'vs 1 process':>12} {'peak mem/proc':>13} "
          f"{'loss at last step':>17} {'wall s':>7}")
    baseline = None
    with tempfile.TemporaryDirectory(prefix="fleetlm-bench-") as workdir:
        for name in args.layouts:
            r = run_layout(name, args.steps, workdir, args.data, args.tokenizer)
            if name == "single":
                baseline = r["tokens_per_s"]
            ratio = f"{r['tokens_per_s'] / baseline:.2f}x" if baseline else "n/a"
            print(f"{name:>8} {r['processes']:>9} {r['tokens_per_s']:>9.0f} {ratio:>12} "
                  f"{r['peak_memory_gib']:>9.2f} GiB {r['last_loss']:>17.4f} {r['wall_s']:>7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
