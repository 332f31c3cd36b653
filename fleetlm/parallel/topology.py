"""The hybrid-parallel layout of a run: degrees, this rank's coordinates, and Paddle fleet's groups.

``resolve_layout`` turns the arguments and the world size into degrees (checked, never guessed);
``init_topology`` starts fleet with those degrees as ``hybrid_configs`` so Paddle's
HybridCommunicateGroup owns the communication groups, exactly as on GPU clusters.

Data parallel degree is derived: world_size / (tensor * pipeline * sharding).
"""

from dataclasses import dataclass
from typing import Optional

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
    dp_rank: int
    hcg: Optional[object] = None

    @property
    def world_size(self) -> int:
        return self.layout.world_size

    @property
    def is_distributed(self) -> bool:
        return self.layout.world_size > 1

    def data_parallel_group(self):
        return self.hcg.get_data_parallel_group() if self.hcg is not None else None


def init_topology(layout: Layout, seed: int) -> Topology:
    """Start Paddle fleet with ``layout`` as hybrid_configs; a single process needs no fleet."""
    if layout.world_size == 1:
        return Topology(layout=layout, rank=0, dp_rank=0)

    from paddle.distributed import fleet

    strategy = fleet.DistributedStrategy()
    strategy.hybrid_configs = {
        "dp_degree": layout.dp_degree,
        "mp_degree": layout.tp_degree,
        "pp_degree": layout.pp_degree,
        "sharding_degree": layout.sharding_degree,
    }
    # Fleet's tensor-parallel RNG tracker is seeded from here; all ranks share the seed.
    strategy.tensor_parallel_configs = {"tensor_init_seed": seed}
    fleet.init(is_collective=True, strategy=strategy)
    hcg = fleet.get_hybrid_communicate_group()
    topology = Topology(
        layout=layout,
        rank=hcg.get_global_rank(),
        dp_rank=hcg.get_data_parallel_rank(),
        hcg=hcg,
    )
    logger.info("fleet started: %s", layout.describe())
    return topology
