"""Parameter count and per-card memory of a run, from its argument file, without allocating the model.

Usage: ``python -m fleetlm.dry_run CONFIG.json [--world_size N] [--key value ...]``

The options are those of ``run_pretrain.py`` (``python run_pretrain.py --help`` lists them), plus
``--world_size N``, the number of cards to size the layout for (default: the product of the
argument file's degrees). ``run_pretrain.py CONFIG.json --dry_run`` prints the same report.

The model is built under ``paddle.LazyGuard`` (shapes only, no parameter memory), and each
parameter is assigned to the cards that hold it:

* tensor parallelism (tensor_parallel_degree t) splits the q/k/v, gate and up projections by
  output features, the o and down projections by input features (their biases stay whole), and
  the token embedding and output layer by vocabulary. Norms and other biases are replicated;
* pipeline parallelism (p stages) gives each stage num_hidden_layers / p blocks. The first stage
  also contains the embeddings and the last the final norm and output layer. The largest stage is reported;
* sharding over s ranks divides the optimizer state (stage1), plus the gradients (stage2), plus
  the parameters (stage3) by s.

Bytes per parameter: fp32 training keeps 4 (parameter) + 4 (gradient) + 8 (AdamW moments);
bf16/fp16 keeps 2 + 2 + 12 (fp32 master weight and moments), as in Paddle's O2 mixed precision.
Activations, temporary buffers and communication buffers are not included.
"""

import math
import sys
from dataclasses import dataclass
from typing import List, Optional, Tuple

from fleetlm.arguments import Arguments, ConfigError, parse_arguments
from fleetlm.data.builder import parse_split
from fleetlm.data.errors import DataError
from fleetlm.models.config import ModelConfig, load_model_config

# Submodule names whose Linear layers tensor parallelism splits (see fleetlm.parallel.plan).
_COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
_ROW_PARALLEL = ("o_proj", "down_proj")


@dataclass
class MemoryEstimate:
    """Parameter counts and per-card bytes of the largest pipeline stage.

    ``card_parameters`` counts the parameters of one tensor-parallel rank of that stage before
    sharding; the byte figures are after sharding.
    """

    total_parameters: int
    card_parameters: int
    parameter_bytes: float
    gradient_bytes: float
    optimizer_bytes: float

    @property
    def total_bytes(self) -> float:
        return self.parameter_bytes + self.gradient_bytes + self.optimizer_bytes


def parameter_shapes(config: ModelConfig) -> List[Tuple[str, List[int]]]:
    """(name, shape) of every parameter of the model ``config`` names, built without memory."""
    import paddle

    from fleetlm.models import build_model

    with paddle.LazyGuard():
        model = build_model(config)
    return [(name, list(p.shape)) for name, p in model.named_parameters()]


def _tensor_parallel_share(name: str, tp: int) -> float:
    """Fraction of the parameter ``name`` that one tensor-parallel rank stores."""
    parts = name.split(".")
    module, kind = parts[-2], parts[-1]
    if module in _COLUMN_PARALLEL:
        return 1.0 / tp
    if module in _ROW_PARALLEL:
        return 1.0 / tp if kind == "weight" else 1.0
    if module in ("embed_tokens", "lm_head"):
        return 1.0 / tp
    return 1.0


def _pipeline_stage(name: str, num_layers: int, pp: int) -> List[int]:
    """Pipeline stages that hold parameter ``name`` (blocks split evenly, embeddings first, head last)."""
    parts = name.split(".")
    if "layers" in parts:
        index = int(parts[parts.index("layers") + 1])
        return [min(index * pp // num_layers, pp - 1)]
    if parts[-2] in ("embed_tokens", "embed_positions", "embed_layernorm", "project_in"):
        return [0]
    return [pp - 1]


def estimate_memory(config: ModelConfig, tp: int, pp: int, sharding_stage: int, sharding_degree: int,
                    low_precision: bool) -> MemoryEstimate:
    """Per-card parameter, gradient and optimizer bytes of the largest pipeline stage."""
    shapes = parameter_shapes(config)
    total = sum(math.prod(shape) for _, shape in shapes)
    per_stage = [0.0] * pp
    for name, shape in shapes:
        share = math.prod(shape) * _tensor_parallel_share(name, tp)
        for stage in _pipeline_stage(name, config.num_hidden_layers, pp):
            per_stage[stage] += share
    if config.tie_word_embeddings and pp > 1:
        # The last stage keeps its own copy of the tied embedding for the output layer.
        vocab_share = config.vocab_size * (config.word_embed_proj_dim or config.hidden_size) / tp
        per_stage[-1] += vocab_share
    card = max(per_stage)

    param_bytes, grad_bytes, optimizer_bytes = (2, 2, 12) if low_precision else (4, 4, 8)
    shard = float(max(sharding_degree, 1))
    return MemoryEstimate(
        total_parameters=total,
        card_parameters=int(card),
        parameter_bytes=card * param_bytes / (shard if sharding_stage >= 3 else 1.0),
        gradient_bytes=card * grad_bytes / (shard if sharding_stage >= 2 else 1.0),
        optimizer_bytes=card * optimizer_bytes / (shard if sharding_stage >= 1 else 1.0),
    )


def layout_degrees(args: Arguments, world_size: Optional[int]) -> Tuple[int, int, int, int, int]:
    """(world size, tp, pp, sharding stage, sharding degree) of the run; reject degrees that do not divide."""
    t = args.training
    tp, pp = t.tensor_parallel_degree, t.pipeline_parallel_degree
    stage = int(t.sharding[-1]) if t.sharding else 0
    sharding = max(t.sharding_parallel_degree, 1) if stage else 1
    if world_size is None:
        world_size = tp * pp * sharding
    if world_size % (tp * pp):
        raise ConfigError(f"world size {world_size} is not divisible by tensor_parallel_degree {tp} x "
                          f"pipeline_parallel_degree {pp}.")
    dp = world_size // (tp * pp)
    if stage and t.sharding_parallel_degree == -1:
        sharding = dp
    if stage and dp % sharding:
        raise ConfigError(f"sharding_parallel_degree {sharding} does not divide the data-parallel degree {dp}.")
    return world_size, tp, pp, stage, sharding


def check_divisibility(config: ModelConfig, tp: int, pp: int) -> None:
    """Reject an architecture that the tensor- and pipeline-parallel degrees cannot split evenly."""
    checks = {
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "intermediate_size": config.intermediate_size,
        "vocab_size": config.vocab_size,
    }
    for key, value in checks.items():
        if value % tp:
            raise ConfigError(f"{key}={value} is not divisible by tensor_parallel_degree={tp}.")
    if config.num_hidden_layers % pp:
        raise ConfigError(
            f"num_hidden_layers={config.num_hidden_layers} is not divisible by pipeline_parallel_degree={pp}."
        )


def describe_run(args: Arguments, world_size: Optional[int] = None) -> str:
    """Return the dry-run report of a parsed argument set (what ``run_pretrain.py --dry_run`` would print)."""
    try:
        # The same check a real run makes when it builds the datasets.
        parse_split(args.data.split)
    except DataError as e:
        raise ConfigError(str(e)) from None
    config = load_model_config(args.model)
    world_size, tp, pp, stage, sharding = layout_degrees(args, world_size)
    check_divisibility(config, tp, pp)
    low_precision = args.training.bf16 or args.training.fp16
    estimate = estimate_memory(config, tp, pp, stage, sharding, low_precision)
    lines = [
        f"model: {args.model.model_name_or_path} ({config.model_type}), {_count(estimate.total_parameters)} parameters",
        f"layout: {_plural(world_size, 'card')} = tp {tp} x pp {pp} x dp {world_size // (tp * pp)}; "
        f"{_describe_sharding(stage, sharding)}; {'bf16/fp16 (O2)' if low_precision else 'fp32'}",
        f"per card, largest pipeline stage: {_count(estimate.card_parameters)} parameters before sharding",
        f"  parameters  {_size(estimate.parameter_bytes)}",
        f"  gradients   {_size(estimate.gradient_bytes)}",
        f"  optimizer   {_size(estimate.optimizer_bytes)}",
        f"  total       {_size(estimate.total_bytes)} (activations not included)",
    ]
    return "\n".join(lines)


def _plural(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def _describe_sharding(stage: int, degree: int) -> str:
    if not stage:
        return "sharding off"
    if degree == 1:
        return f"sharding stage{stage} over 1 rank, which divides nothing (raise sharding_parallel_degree or the card count)"
    return f"sharding stage{stage} over {degree} ranks"


def _count(number: float) -> str:
    """Format a parameter count in billions, or in millions below 1B ("7.721B", "13.8M", "0.158M")."""
    return f"{number / 1e9:.3f}B" if number >= 1e9 else f"{number / 1e6:.3g}M"


def _size(num_bytes: float) -> str:
    """Format a byte count in GiB, or in MiB below 1 GiB, right-aligned for the report's column."""
    if num_bytes >= 2**30:
        return f"{num_bytes / 2**30:8.2f} GiB"
    return f"{num_bytes / 2**20:8.2f} MiB"


def _pop_world_size(argv: List[str]) -> Optional[int]:
    """Remove ``--world_size N`` from ``argv`` and return N, or None when it is absent. Reject a missing or invalid N."""
    if "--world_size" not in argv:
        return None
    index = argv.index("--world_size")
    has_value = index + 1 < len(argv) and not argv[index + 1].startswith("--")
    text = argv[index + 1] if has_value else ""
    del argv[index:index + 1 + has_value]
    if "--world_size" in argv:
        raise ConfigError("--world_size is given twice on the command line; keep one.")
    if not has_value:
        raise ConfigError("--world_size needs a value: the number of cards, e.g. --world_size 8.")
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(f"--world_size {text!r}: expected a positive number of cards, e.g. --world_size 8.")
    return int(text)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    try:
        world_size = _pop_world_size(argv)
        print(describe_run(parse_arguments(argv), world_size))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
