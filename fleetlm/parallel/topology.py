"""The hybrid-parallel layout of a run: degrees, this rank's coordinates, and Paddle fleet's groups.

``resolve_layout`` turns the arguments and the world size into degrees (checked, never guessed);
``init_topology`` starts fleet with those degrees as ``hybrid_configs`` so Paddle's
HybridCommunicateGroup owns the communication groups, exactly as on GPU clusters.

Data parallel degree is derived: world_size / (tensor * pipeline * sharding). Sharding ranks
read different samples like data-parallel ranks, so the batch is split over dp x sharding ranks.
"""

from dataclasses import dataclass
from typing import Dict, Optional

from fleetlm.arguments import ConfigError, TrainingArguments
from fleetlm.utils.log import get_logger

logger = get_logger(__name__)


@dataclass(frozen=True)
class Layout:
    """Parallel degrees; their product is the world size."""

    dp_degree: int
    tp_degree: int = 1
    pp_degree: int = 1
    sharding_degree: int = 1

    @property
    def world_size(self) -> int:
        return self.dp_degree * self.tp_degree * self.pp_degree * self.sharding_degree

    @property
    def data_parallel_width(self) -> int:
        """Ranks that read different samples: data-parallel x sharding."""
        return self.dp_degree * self.sharding_degree

    def to_dict(self) -> dict:
        return {
            "dp_degree": self.dp_degree,
            "tp_degree": self.tp_degree,
            "pp_degree": self.pp_degree,
            "sharding_degree": self.sharding_degree,
        }

    def describe(self) -> str:
        return (
            f"dp={self.dp_degree} tp={self.tp_degree} pp={self.pp_degree} sharding={self.sharding_degree} "
            f"({self.world_size} processes)"
        )


def resolve_layout(args: TrainingArguments, world_size: int) -> Layout:
    """Derive the data-parallel degree from the world size and the other degrees, or raise ConfigError."""
    tp, pp = args.tensor_parallel_degree, args.pipeline_parallel_degree
    if args.sharding:
        sharding = args.sharding_parallel_degree if args.sharding_parallel_degree != -1 else world_size // (tp * pp)
    else:
        sharding = 1
    fixed = tp * pp * sharding
    if fixed < 1 or world_size % fixed:
        raise ConfigError(
            f"tensor_parallel_degree={tp} x pipeline_parallel_degree={pp} x sharding degree={sharding} = {fixed} "
            f"does not divide the {world_size} launched processes; launch a multiple of {fixed} processes "
            "or change the degrees."
        )
    return Layout(dp_degree=world_size // fixed, tp_degree=tp, pp_degree=pp, sharding_degree=sharding)


@dataclass
class Topology:
    """This process's place in the layout; ``hcg`` is fleet's HybridCommunicateGroup (None in one process)."""

    layout: Layout
    rank: int
    dp_rank: int  # index among the ranks that read different samples (data-parallel x sharding)
    hcg: Optional[object] = None
    tp_rank: int = 0
    pp_rank: int = 0
    sharding_rank: int = 0

    @property
    def world_size(self) -> int:
        return self.layout.world_size

    @property
    def is_distributed(self) -> bool:
        return self.layout.world_size > 1

    def data_parallel_groups(self) -> list:
        """Return the groups that per-rank losses are averaged over: data-parallel and sharding, when > 1."""
        groups = []
        if self.layout.dp_degree > 1:
            groups.append(self.hcg.get_data_parallel_group())
        if self.layout.sharding_degree > 1:
            groups.append(self.hcg.get_sharding_parallel_group())
        return groups


def init_topology(
    layout: Layout,
    seed: int,
    micro_batch_size: int = 1,
    accumulation_steps: int = 1,
    sharding: str = "",
    option_strings: Optional[Dict[str, str]] = None,
) -> Topology:
    """Start Paddle fleet with ``layout`` as hybrid_configs; a single process needs no fleet.

    On CPU builds the replacements of ``fleetlm.parallel.cpu_compat`` are installed first, because
    fleet creates its communication groups inside ``fleet.init``. ``option_strings`` contains the
    PaddleNLP pipeline/tensor/sharding_parallel_config strings.
    """
    if layout.world_size == 1:
        return Topology(layout=layout, rank=0, dp_rank=0)

    import paddle
    from paddle.distributed import fleet

    from fleetlm.parallel.cpu_compat import apply_cpu_compat
    from fleetlm.parallel.fleet_configs import device_dependent_configs

    apply_cpu_compat()
    strategy = fleet.DistributedStrategy()
    hybrid_configs = {
        "dp_degree": layout.dp_degree,
        "mp_degree": layout.tp_degree,
        "pp_degree": layout.pp_degree,
        "sharding_degree": layout.sharding_degree,
    }
    device_configs, messages = device_dependent_configs(
        layout, sharding, option_strings or {}, paddle.is_compiled_with_cuda()
    )
    # The hybrid_configs setter takes pp_configs as a dict but not sharding_configs, which is set field by field.
    sharding_configs = device_configs.pop("sharding_configs", {})
    hybrid_configs.update(device_configs)
    for message in messages:
        logger.info("%s", message)
    if layout.pp_degree > 1:
        strategy.pipeline_configs = {"accumulate_steps": accumulation_steps, "micro_batch_size": micro_batch_size}
    strategy.hybrid_configs = hybrid_configs
    for key, value in sharding_configs.items():
        setattr(strategy.hybrid_configs["sharding_configs"], key, value)
    # Fleet's tensor-parallel RNG tracker is seeded from here; all ranks share the seed.
    strategy.tensor_parallel_configs = {"tensor_init_seed": seed}
    fleet.init(is_collective=True, strategy=strategy)
    hcg = fleet.get_hybrid_communicate_group()
    sharding_rank = hcg.get_sharding_parallel_rank()
    topology = Topology(
        layout=layout,
        rank=hcg.get_global_rank(),
        dp_rank=hcg.get_data_parallel_rank() * layout.sharding_degree + sharding_rank,
        hcg=hcg,
        tp_rank=hcg.get_model_parallel_rank(),
        pp_rank=hcg.get_stage_id(),
        sharding_rank=sharding_rank,
    )
    logger.info("fleet started: %s", layout.describe())
    return topology
