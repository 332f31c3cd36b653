"""The fleet ``hybrid_configs`` entries that depend on the device: batched p2p and sharding tensor fusion.

Both are fast paths that Paddle 3.3.1 implements only on GPU (and NPU/XPU) builds:
    pipeline p2p       batched ``batch_isend_irecv`` on calc streams; gloo has neither, so CPU runs
                       send activations with ordered isend/irecv (``cpu_pipeline_configs``)
    stage-1 fusion     sharding stage 1 packing gradients and parameters into fused buffers; CPU
                       raises "tensor fusion helper now only support gpu, npu, xpu"
The option strings follow PaddleNLP: ``pipeline_parallel_config="disable_batch_p2p_comm"`` turns
batched p2p off on GPU; ``sharding_parallel_config="enable_stage1_tensor_fusion"`` turns fusion on.
Other tokens of the three option strings are logged as not applied.
"""

from typing import Dict, List, Tuple

APPLIED_TOKENS = {
    "pipeline_parallel_config": ("disable_batch_p2p_comm",),
    "sharding_parallel_config": ("enable_stage1_tensor_fusion",),
    "tensor_parallel_config": (),
}


def parse_tokens(value: str) -> List[str]:
    """Split a PaddleNLP option string ("a b,c") into its tokens."""
    return value.replace(",", " ").split()


def device_dependent_configs(
    layout, sharding: str, option_strings: Dict[str, str], cuda: bool
) -> Tuple[Dict[str, dict], List[str]]:
    """Return the hybrid_configs entries to add for this device, and one log line per decision."""
    configs: Dict[str, dict] = {}
    messages: List[str] = []
    tokens = {key: parse_tokens(option_strings.get(key, "")) for key in APPLIED_TOKENS}

    if layout.pp_degree > 1:
        batched = cuda and "disable_batch_p2p_comm" not in tokens["pipeline_parallel_config"]
        configs["pp_configs"] = {"use_batch_p2p_comm": batched}
        if batched:
            messages.append("pipeline p2p: batched send/recv (CUDA build)")
        elif cuda:
            messages.append("pipeline p2p: ordered isend/irecv (disable_batch_p2p_comm)")
        else:
            messages.append("pipeline p2p: ordered isend/irecv, because gloo has no batched p2p (CPU build)")

    if sharding == "stage1" and layout.sharding_degree > 1:
        requested = "enable_stage1_tensor_fusion" in tokens["sharding_parallel_config"]
        fused = requested and cuda
        configs["sharding_configs"] = {"tensor_fusion": fused}
        if fused:
            messages.append("sharding stage1: tensor fusion on (enable_stage1_tensor_fusion, CUDA build)")
        elif requested:
            messages.append("sharding stage1: tensor fusion off, because Paddle has no CPU implementation of it")
        else:
            messages.append("sharding stage1: tensor fusion off (enable_stage1_tensor_fusion not set)")

    for key, values in tokens.items():
        ignored = [token for token in values if token not in APPLIED_TOKENS[key]]
        if ignored:
            messages.append(f"{key}: {' '.join(ignored)} not applied by fleetlm")
    return configs, messages
