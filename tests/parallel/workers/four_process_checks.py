"""Four-process checks: dp2 x mp2 fleet.init with tensor-parallel training, or pp4 with 2 virtual stages.

Usage: four_process_checks.py OUT_DIR {dp2_mp2|pp4_vpp2}
"""

import sys

import numpy as np
import paddle
import paddle.distributed as dist
import paddle.nn.functional as F
from check_util import CheckRecorder, out_dir_argument, relative_difference
from mp2_checks import check_tensor_parallel_training
from paddle.distributed import fleet

from fleetlm.parallel.cpu_compat import apply_cpu_compat, cpu_pipeline_configs

HIDDEN, VOCAB, SEQ, NUM_BLOCKS = 8, 16, 4, 8
MICRO_BATCH, ACCUMULATE_STEPS, CLIP_NORM = 1, 4, 0.5


def run_dp2_mp2(recorder: CheckRecorder) -> None:
    strategy = fleet.DistributedStrategy()
    strategy.hybrid_configs = {"dp_degree": 2, "mp_degree": 2, "pp_degree": 1}
    with recorder.check("dp2_mp2_fleet_init"):
        fleet.init(is_collective=True, strategy=strategy)
    hcg = fleet.get_hybrid_communicate_group()
    check_tensor_parallel_training(
        recorder, hcg.get_model_parallel_rank(), hcg, dp_rank=hcg.get_data_parallel_rank(), dp_degree=2
    )


def full_array(seed: int, shape) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype("float32") * 0.5


class Embedding(paddle.nn.Layer):
    def __init__(self):
        super().__init__()
        self.embedding = paddle.nn.Embedding(VOCAB, HIDDEN)
        self.embedding.weight.set_value(full_array(1, [VOCAB, HIDDEN]))

    def forward(self, ids):
        return self.embedding(ids)


class Block(paddle.nn.Layer):
    def __init__(self, seed: int):
        super().__init__()
        self.seed = seed
        self.linear = paddle.nn.Linear(HIDDEN, HIDDEN)
        self.linear.weight.set_value(full_array(seed, [HIDDEN, HIDDEN]))
        self.linear.bias.set_value(full_array(seed + 1, [HIDDEN]))

    def forward(self, hidden):
        return hidden + F.gelu(self.linear(hidden))


class Head(paddle.nn.Layer):
    def __init__(self):
        super().__init__()
        self.linear = paddle.nn.Linear(HIDDEN, VOCAB, bias_attr=False)
        self.linear.weight.set_value(full_array(2, [HIDDEN, VOCAB]))

    def forward(self, hidden):
        return self.linear(hidden)


class TokenLoss(paddle.nn.Layer):
    def forward(self, logits, labels):
        return F.cross_entropy(logits, labels.unsqueeze(-1)).mean()


def run_pp4_vpp2(recorder: CheckRecorder) -> None:
    from paddle.distributed.fleet.meta_parallel import LayerDesc, PipelineLayer

    strategy = fleet.DistributedStrategy()
    strategy.hybrid_configs = {"dp_degree": 1, "mp_degree": 1, "pp_degree": 4, "pp_configs": cpu_pipeline_configs()}
    strategy.pipeline_configs = {"accumulate_steps": ACCUMULATE_STEPS, "micro_batch_size": MICRO_BATCH}
    fleet.init(is_collective=True, strategy=strategy)

    with recorder.check("pp4_vpp2_training") as result:
        seeds = [10 * (index + 1) for index in range(NUM_BLOCKS)]
        pipe = PipelineLayer(
            layers=[LayerDesc(Embedding)] + [LayerDesc(Block, seed=s) for s in seeds] + [LayerDesc(Head)],
            num_stages=4,
            num_virtual_pipeline_stages=2,
            loss_fn=TokenLoss(),
            seg_method="layer:Block",
        )
        reference = [Embedding()] + [Block(s) for s in seeds] + [Head()]
        model = fleet.distributed_model(pipe)
        optimizer = fleet.distributed_optimizer(
            paddle.optimizer.AdamW(
                learning_rate=0.05, parameters=pipe.parameters(), weight_decay=0.01,
                grad_clip=paddle.nn.ClipGradByGlobalNorm(CLIP_NORM),
            )
        )
        ref_optimizer = paddle.optimizer.AdamW(
            learning_rate=0.05, parameters=[p for layer in reference for p in layer.parameters()],
            weight_decay=0.01, grad_clip=paddle.nn.ClipGradByGlobalNorm(CLIP_NORM),
        )

        rng = np.random.default_rng(5)
        losses, ref_losses = [], []
        for _ in range(2):
            ids = rng.integers(0, VOCAB, [MICRO_BATCH * ACCUMULATE_STEPS, SEQ])
            labels = rng.integers(0, VOCAB, [MICRO_BATCH * ACCUMULATE_STEPS, SEQ])
            loss = model.train_batch([paddle.to_tensor(ids), paddle.to_tensor(labels)], optimizer)
            losses.append(float(loss.numpy().reshape([-1])[0]))

            hidden = paddle.to_tensor(ids)
            for layer in reference[:-1]:
                hidden = layer(hidden)
            # The pipeline averages the per-micro-batch mean losses.
            micro_losses = [
                TokenLoss()(reference[-1](hidden[i : i + MICRO_BATCH]), paddle.to_tensor(labels[i : i + MICRO_BATCH]))
                for i in range(0, MICRO_BATCH * ACCUMULATE_STEPS, MICRO_BATCH)
            ]
            ref_loss = paddle.add_n(micro_losses) / ACCUMULATE_STEPS
            ref_loss.backward()
            ref_optimizer.step()
            ref_optimizer.clear_grad()
            ref_losses.append(float(ref_loss))

        ref_blocks = {layer.seed: layer for layer in reference if isinstance(layer, Block)}
        differences = {"loss": relative_difference(losses, ref_losses)}
        for layer in pipe.sublayers():
            if isinstance(layer, Block):
                differences[f"block{layer.seed}"] = relative_difference(
                    layer.linear.weight.numpy(), ref_blocks[layer.seed].linear.weight.numpy()
                )
            elif isinstance(layer, Embedding):
                differences["embedding"] = relative_difference(
                    layer.embedding.weight.numpy(), reference[0].embedding.weight.numpy()
                )
            elif isinstance(layer, Head):
                differences["head"] = relative_difference(layer.linear.weight.numpy(), reference[-1].linear.weight.numpy())
        result["differences"] = differences
        result["rel_diff"] = max(differences.values())


def main() -> None:
    apply_cpu_compat()
    recorder = CheckRecorder(int(paddle.distributed.ParallelEnv().rank))
    mode = sys.argv[2]
    if mode == "dp2_mp2":
        run_dp2_mp2(recorder)
    elif mode == "pp4_vpp2":
        run_pp4_vpp2(recorder)
    else:
        raise ValueError(f"unknown mode {mode!r}; expected dp2_mp2 or pp4_vpp2")
    recorder.results["rank"] = {"global_rank": dist.get_rank()}
    recorder.write(out_dir_argument())


if __name__ == "__main__":
    main()
