"""Every JSON argument file of the model folders parses, validates and builds its model for its layout.

A file name states its layout: ``tp2sd4`` is tensor_parallel_degree 2 with sharding over 4 ranks
(8 cards), ``sd8`` sharding over 8 ranks, ``dp8`` eight data-parallel ranks, ``tp4pp2`` tensor 4 x
pipeline 2; ``debug`` and ``demo`` files run in one process. The model is built with shapes only
(paddle.LazyGuard, no parameter memory).
"""

import glob
import os
import re

import pytest

from fleetlm.arguments import parse_arguments
from fleetlm.dry_run import check_divisibility, estimate_memory, layout_degrees
from fleetlm.models import load_model_config
from fleetlm.validate import plan_run

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_FOLDERS = ("llama", "qwen", "gpt-3", "chatglm", "bloom", "opt", "glm", "baichuan")
ARGUMENT_FILES = sorted(
    path for folder in MODEL_FOLDERS for path in glob.glob(os.path.join(REPO_ROOT, folder, "*.json"))
)

def named_layout(path):
    """(tp, pp, sharding degree, data-parallel degree) that the file name states."""
    name = os.path.basename(path)
    if "debug" in name or "demo" in name:
        return 1, 1, 1, 1
    match = re.search(r"-(?:tp(\d+))?(?:pp(\d+))?(?:sd(\d+))?(?:dp(\d+))?(?:-stage\d)?\.json$", name)
    if name == "pretrain_argument_stage2.json":
        return 1, 1, 8, 8  # the Qwen README's command: sharding stage2 over 8 cards
    assert match and any(match.groups()), f"{name}: the file name states no layout"
    tp, pp, sd, dp = (int(g) if g else None for g in match.groups())
    return tp or 1, pp or 1, sd or 1, dp or sd or 1


def test_every_model_folder_has_files():
    folders = {os.path.basename(os.path.dirname(p)) for p in ARGUMENT_FILES}
    assert {"llama", "qwen", "gpt-3", "chatglm", "bloom", "opt", "glm"} <= folders


@pytest.mark.parametrize("path", ARGUMENT_FILES, ids=lambda p: os.path.relpath(p, REPO_ROOT))
def test_argument_file_valid_for_its_layout(path, tmp_path):
    args = parse_arguments([path, "--output_dir", str(tmp_path / "out")])
    tokenizer = args.model.tokenizer_name_or_path
    if tokenizer and tokenizer.startswith("./"):
        # A path that a preparation step creates (the demo's tokenizer); plan_run's check needs the file.
        args.model.tokenizer_name_or_path = None
    t = args.training
    tp, pp, sharding_degree, dp = named_layout(path)
    assert t.tensor_parallel_degree == tp
    assert t.pipeline_parallel_degree == pp
    if sharding_degree > 1:
        assert t.sharding in ("stage1", "stage2", "stage3")
        assert t.sharding_parallel_degree in (sharding_degree, -1)
    world_size = tp * pp * dp

    config = load_model_config(args.model)
    check_divisibility(config, tp, pp)
    _, _, _, stage, sharding = layout_degrees(args, world_size)
    estimate = estimate_memory(config, tp, pp, stage, sharding, t.bf16 or t.fp16)
    assert estimate.card_parameters <= estimate.total_parameters
    assert args.data.max_seq_length <= config.max_position_embeddings

    samples = t.per_device_train_batch_size * t.gradient_accumulation_steps * dp
    if t.global_batch_size:
        assert t.global_batch_size == samples
    if world_size == 8 and "gpt-3" not in path:
        # The 8-card layouts train on 256K tokens per step: 64 samples of 4096 (or 128 of 2048);
        # the GPT-3 files follow the GPT-3 paper's batch sizes instead.
        assert samples * args.data.max_seq_length == 64 * 4096

    plan = plan_run(args, world_size)
    assert plan.model_config.model_type == config.model_type
    assert plan.layout.world_size == world_size
    assert (plan.layout.tp_degree, plan.layout.pp_degree) == (tp, pp)


def test_dry_run_report_of_tiny_model():
    from fleetlm.dry_run import describe_run

    report = describe_run(parse_arguments(["--model_name_or_path", "fleetlm/tiny-llama"]), world_size=1)
    assert "fleetlm/tiny-llama (llama), 0.158M parameters" in report
    assert "MiB (activations not included)" in report
