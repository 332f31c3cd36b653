"""Throughput, model FLOPs utilisation and memory numbers for the metrics line."""

import json
import os
import resource
import time
from typing import Any, Dict, Optional, Tuple

import numpy as np
import paddle

from fleetlm.utils.log import get_logger

logger = get_logger(__name__)

# Dense bf16/fp16 tensor-core peak per card, TFLOPS, from NVIDIA's datasheets (without sparsity).
GPU_PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "H800": 989.0,
    "H20": 148.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "A10": 125.0,
    "V100": 125.0,
}


def matmul_params(model: paddle.nn.Layer, tied_embeddings: bool) -> int:
    """Parameters that take part in a matmul per token: all of them minus the lookup tables.

    An untied token embedding and a learned position table (GPT-3, OPT) are
    table lookups, not matmuls, so they are left out of the 6N count.
    """
    total = 0
    for name, p in model.named_parameters():
        lookup = name.endswith("embed_positions.weight") or (
            name.endswith("embed_tokens.weight") and not tied_embeddings
        )
        if not lookup:
            total += int(np.prod(p.shape))
    return total


def flops_per_token(num_matmul_params: int) -> float:
    """Training FLOPs per token by the 6N rule (Kaplan et al., 2020): 2N forward + 4N backward.

    NOTE: the attention score and value products (12 * layers * hidden * seq per token, PaLM appendix B)
    are left out, as in the plain 6N rule. At long sequences this understates the work done.
    Recompute adds a forward pass that is not counted either, so MFU stays comparable across settings.
    """
    return 6.0 * num_matmul_params


def measure_matmul_tflops(size: int = 1024, seconds: float = 1.0) -> float:
    """Measure this process's fp32 matmul rate with Paddle, in TFLOPS (used as the CPU peak)."""
    a = paddle.rand([size, size], dtype="float32")
    b = paddle.rand([size, size], dtype="float32")
    paddle.matmul(a, b)  # warm-up: first call allocates and picks the kernel
    count = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        c = paddle.matmul(a, b)
        count += 1
    float(c[0, 0])  # wait for the result
    elapsed = time.perf_counter() - start
    return 2.0 * size**3 * count / elapsed / 1e12


def resolve_peak_tflops(user_value: float) -> Tuple[float, str]:
    """Return (peak TFLOPS per card, where it came from) for the MFU denominator."""
    if user_value > 0:
        return user_value, "peak_tflops argument"
    if paddle.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0:
        name = paddle.device.cuda.get_device_name()
        for key, value in GPU_PEAK_TFLOPS.items():
            if key in name:
                return value, f"datasheet bf16 peak of {name}"
        logger.warning("no peak FLOPS known for GPU '%s'; set peak_tflops for MFU", name)
        return 0.0, f"unknown GPU {name}"
    rate = measure_matmul_tflops()
    threads = os.environ.get("OMP_NUM_THREADS", "default")
    mkl = os.environ.get("MKL_DEBUG_CPU_TYPE", "unset")
    return rate, f"fp32 matmul rate measured at start-up (OMP_NUM_THREADS={threads}, MKL_DEBUG_CPU_TYPE={mkl})"


def peak_memory_gib() -> Tuple[float, str]:
    """Return (peak memory of this process in GiB, what was measured)."""
    if paddle.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0:
        return paddle.device.cuda.max_memory_allocated() / 2**30, "GPU allocated"
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "host RSS"


class MetricsWriter:
    """Append one JSON object per record to OUTPUT_DIR/metrics.jsonl (rank 0 only).

    On resume the file is cut back to the records of steps up to the checkpoint step, so a resumed
    run's file reads the same as an uninterrupted run's.
    """

    def __init__(self, output_dir: str, enabled: bool, resume_step: Optional[int]):
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.enabled = enabled
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        if resume_step is None:
            if os.path.exists(self.path):
                # Keep every earlier run's metrics: name the old file after its modification time.
                stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(os.path.getmtime(self.path)))
                kept = f"{self.path}.{stamp}"
                os.replace(self.path, kept)
                logger.info("moved the metrics of an earlier run to %s", kept)
            return
        if os.path.exists(self.path):
            kept = []
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut by a kill
                    if record.get("step", 0) <= resume_step:
                        kept.append(line if line.endswith("\n") else line + "\n")
            tmp = self.path + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(kept)
            os.replace(tmp, self.path)

    def write(self, record: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
