"""Two-process sharding checks: stage 1 (fleet sharding_degree=2) and group_sharded_parallel stages 2 and 3.

Each rank trains on its own batch. The reference is one process that trains on both batches with the
mean of the two batch losses, plain AdamW and global-norm clipping. Three steps each.
"""

import numpy as np
import paddle
import paddle.distributed as dist
import paddle.nn.functional as F
from check_util import CheckRecorder, error_text, out_dir_argument, relative_difference
from paddle.distributed import fleet

from fleetlm.parallel.cpu_compat import apply_cpu_compat, original

HIDDEN, FFN, BATCH = 8, 16, 4
STEPS, CLIP_NORM = 3, 0.5


def full_array(seed: int, shape) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype("float32") * 0.5


class Mlp(paddle.nn.Layer):
    def __init__(self):
        super().__init__()
        self.up = paddle.nn.Linear(HIDDEN, FFN)
        self.down = paddle.nn.Linear(FFN, HIDDEN)
        for seed, parameter in enumerate(self.parameters()):
            parameter.set_value(full_array(seed, parameter.shape))

    def forward(self, x):
        return self.down(F.gelu(self.up(x))).square().mean()


def make_optimizer(model: paddle.nn.Layer) -> paddle.optimizer.AdamW:
    return paddle.optimizer.AdamW(
        learning_rate=0.05, parameters=model.parameters(), weight_decay=0.01,
        grad_clip=paddle.nn.ClipGradByGlobalNorm(CLIP_NORM),
    )


def batches(rank: int) -> list[paddle.Tensor]:
    return [paddle.to_tensor(full_array(100 + 10 * step + rank, [BATCH, HIDDEN])) for step in range(STEPS)]


def reference_parameters() -> list[np.ndarray]:
    model = Mlp()
    optimizer = make_optimizer(model)
    for step in range(STEPS):
        loss = (model(batches(0)[step]) + model(batches(1)[step])) / 2
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
    return [p.numpy() for p in model.parameters()]


def main() -> None:
    apply_cpu_compat()
    # Imported after apply_cpu_compat(): a name bound earlier would keep Paddle's original function.
    from paddle.distributed.sharding import group_sharded_parallel

    strategy = fleet.DistributedStrategy()
    strategy.hybrid_configs = {"dp_degree": 1, "mp_degree": 1, "pp_degree": 1, "sharding_degree": 2}
    fleet.init(is_collective=True, strategy=strategy)
    hcg = fleet.get_hybrid_communicate_group()
    sharding_group = hcg.get_sharding_parallel_group()
    rank = hcg.get_sharding_parallel_rank()
    recorder = CheckRecorder(dist.get_rank())
    expected = reference_parameters()

    with recorder.check("sharding_stage1") as result:
        model = Mlp()
        optimizer = fleet.distributed_optimizer(make_optimizer(model))
        model = fleet.distributed_model(model)
        for x in batches(rank):
            model(x).backward()
            optimizer.step()
            optimizer.clear_grad()
        result["rel_diff"] = max(relative_difference(p.numpy(), e) for p, e in zip(model.parameters(), expected))

    with recorder.check("unpatched_group_sharded_parallel") as result:
        model = Mlp()
        result["raised"] = error_text(
            original("sharding.group_sharded_parallel"), model, make_optimizer(model), "os_g", group=sharding_group
        )

    for level, name in (("os_g", "sharding_stage2"), ("p_g_os", "sharding_stage3")):
        with recorder.check(name) as result:
            model = Mlp()
            # A small segment_size makes stage 3 shard these small parameters too.
            model, optimizer, _ = group_sharded_parallel(
                model, make_optimizer(model), level, group=sharding_group, segment_size=16
            )
            for x in batches(rank):
                model(x).backward()
                optimizer.step()
                optimizer.clear_grad()
            if level == "p_g_os":
                model.get_all_parameters()
            result["rel_diff"] = max(relative_difference(p.numpy(), e) for p, e in zip(model.parameters(), expected))
    recorder.write(out_dir_argument())


if __name__ == "__main__":
    main()
