"""Two-process pipeline check: a 2-stage PipelineLayer with a tied embedding/head against the same layers run in order.

fleet with pp_degree=2, 1F1B schedule, 4 micro-batches of 2, three AdamW steps with global-norm clipping.
"""

import numpy as np
import paddle
import paddle.distributed as dist
import paddle.nn.functional as F
from check_util import CheckRecorder, error_text, out_dir_argument, relative_difference
from paddle.distributed import fleet

from fleetlm.parallel.cpu_compat import apply_cpu_compat, cpu_pipeline_configs, original

HIDDEN, VOCAB, SEQ = 8, 16, 4
MICRO_BATCH, ACCUMULATE_STEPS = 2, 4
CLIP_NORM = 0.5


def full_array(seed: int, shape) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype("float32") * 0.5


class Embedding(paddle.nn.Layer):
    def __init__(self):
        super().__init__()
        self.weight = self.create_parameter([VOCAB, HIDDEN])
        self.weight.set_value(full_array(1, [VOCAB, HIDDEN]))

    def forward(self, ids):
        return F.embedding(ids, self.weight)


def tied_head(embedding: Embedding, hidden):
    return paddle.matmul(hidden, embedding.weight, transpose_y=True)


class Block(paddle.nn.Layer):
    def __init__(self, seed: int):
        super().__init__()
        self.seed = seed
        self.linear = paddle.nn.Linear(HIDDEN, HIDDEN)
        self.linear.weight.set_value(full_array(seed, [HIDDEN, HIDDEN]))
        self.linear.bias.set_value(full_array(seed + 1, [HIDDEN]))

    def forward(self, hidden):
        return hidden + F.gelu(self.linear(hidden))


class TokenLoss(paddle.nn.Layer):
    def forward(self, logits, labels):
        return F.cross_entropy(logits, labels.unsqueeze(-1)).mean()


@paddle.no_grad()
def clip_counting_tied_weight_twice(parameters, tied_weight) -> None:
    """Scale gradients by ``CLIP_NORM / max(norm, CLIP_NORM)`` as ``ClipGradByGlobalNorm`` does.

    The norm counts the tied embedding's gradient twice, as fleet's pipeline clip does in Paddle 3.3.1.
    Both stages keep a copy of the shared weight, and ``PipelineLayer`` marks neither copy as the
    duplicate because it compares ``param.name`` with the attribute name "weight".
    """
    squared = sum(float((p.grad * p.grad).sum()) for p in parameters)
    squared += float((tied_weight.grad * tied_weight.grad).sum())
    factor = CLIP_NORM / max(squared**0.5, CLIP_NORM)
    for p in parameters:
        p.grad.scale_(factor)


def main() -> None:
    apply_cpu_compat()
    from paddle.distributed.fleet.meta_parallel import LayerDesc, PipelineLayer, SharedLayerDesc

    strategy = fleet.DistributedStrategy()
    strategy.hybrid_configs = {"dp_degree": 1, "mp_degree": 1, "pp_degree": 2, "pp_configs": cpu_pipeline_configs()}
    strategy.pipeline_configs = {"accumulate_steps": ACCUMULATE_STEPS, "micro_batch_size": MICRO_BATCH}
    fleet.init(is_collective=True, strategy=strategy)
    recorder = CheckRecorder(dist.get_rank())

    with recorder.check("unpatched_parallel_env_device_id") as result:
        from paddle.distributed.parallel import ParallelEnv

        result["raised"] = error_text(original("ParallelEnv.device_id").fget, ParallelEnv())

    with recorder.check("pipeline_tied_embedding_training") as result:
        pipe = PipelineLayer(
            layers=[
                SharedLayerDesc("embed", Embedding, shared_weight_attr="weight"),
                LayerDesc(Block, seed=10),
                LayerDesc(Block, seed=20),
                SharedLayerDesc("embed", Embedding, forward_func=tied_head, shared_weight_attr="weight"),
            ],
            num_stages=2,
            loss_fn=TokenLoss(),
            seg_method="uniform",
        )
        reference = [Embedding(), Block(10), Block(20)]

        model = fleet.distributed_model(pipe)
        optimizer = fleet.distributed_optimizer(
            paddle.optimizer.AdamW(
                learning_rate=0.05, parameters=pipe.parameters(), weight_decay=0.01,
                grad_clip=paddle.nn.ClipGradByGlobalNorm(CLIP_NORM),
            )
        )
        ref_parameters = [p for layer in reference for p in layer.parameters()]
        ref_optimizer = paddle.optimizer.AdamW(learning_rate=0.05, parameters=ref_parameters, weight_decay=0.01)

        rng = np.random.default_rng(5)
        losses, ref_losses = [], []
        for _ in range(3):
            ids = rng.integers(0, VOCAB, [MICRO_BATCH * ACCUMULATE_STEPS, SEQ])
            labels = rng.integers(0, VOCAB, [MICRO_BATCH * ACCUMULATE_STEPS, SEQ])
            loss = model.train_batch([paddle.to_tensor(ids), paddle.to_tensor(labels)], optimizer)
            losses.append(float(loss.numpy().reshape([-1])[0]))  # shape [1] on the first stage, [] on the last

            hidden = reference[0](paddle.to_tensor(ids))
            hidden = reference[2](reference[1](hidden))
            ref_loss = TokenLoss()(tied_head(reference[0], hidden), paddle.to_tensor(labels))
            ref_loss.backward()
            clip_counting_tied_weight_twice(ref_parameters, reference[0].weight)
            ref_optimizer.step()
            ref_optimizer.clear_grad()
            ref_losses.append(float(ref_loss))

        differences = {"embedding": relative_difference(pipe.shared_layers["embed"].weight.numpy(), reference[0].weight.numpy())}
        ref_blocks = {block.seed: block for block in reference[1:]}
        for layer in pipe.run_function:
            if isinstance(layer, Block):
                differences[f"block{layer.seed}.weight"] = relative_difference(
                    layer.linear.weight.numpy(), ref_blocks[layer.seed].linear.weight.numpy()
                )
                differences[f"block{layer.seed}.bias"] = relative_difference(
                    layer.linear.bias.numpy(), ref_blocks[layer.seed].linear.bias.numpy()
                )
        # train_batch broadcasts the last stage's loss to every stage.
        differences["loss"] = relative_difference(losses, ref_losses)
        result["differences"] = differences
        result["rel_diff"] = max(differences.values())
    recorder.write(out_dir_argument())


if __name__ == "__main__":
    main()
