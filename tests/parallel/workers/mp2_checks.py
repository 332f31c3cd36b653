"""Two-process checks under fleet with mp_degree=2: collectives, mp_ops, layers, sequence parallel, checkpoints.

Each check compares the parallel result with plain Paddle ops on the full tensors, computed in the
same process from the same seed. Checks named ``unpatched_*`` record the error Paddle's original
raises on CPU, so that a Paddle upgrade that changes it is noticed.
"""

import os
import sys

import numpy as np
import paddle
import paddle.distributed as dist
import paddle.nn.functional as F
from check_util import CheckRecorder, error_text, out_dir_argument, relative_difference
from paddle.distributed import fleet

from fleetlm.parallel.cpu_compat import apply_cpu_compat, original

HIDDEN, FFN, VOCAB = 8, 16, 12
BATCH, SEQ = 2, 4
IGNORE_INDEX = -100


def full_array(seed: int, shape) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype("float32")


def main() -> None:
    applied = apply_cpu_compat()
    strategy = fleet.DistributedStrategy()
    strategy.hybrid_configs = {"dp_degree": 1, "mp_degree": 2, "pp_degree": 1}
    fleet.init(is_collective=True, strategy=strategy)
    hcg = fleet.get_hybrid_communicate_group()
    mp_group = hcg.get_model_parallel_group()
    rank = hcg.get_model_parallel_rank()
    recorder = CheckRecorder(dist.get_rank())
    recorder.results["applied"] = {"names": applied, "second_call": apply_cpu_compat()}

    check_collectives(recorder, rank)
    check_mp_ops_unpatched(recorder, mp_group)
    check_mlp(recorder, rank)
    check_gather_and_split(recorder, rank)
    check_embedding(recorder, rank)
    check_cross_entropy(recorder, rank, mp_group)
    check_tensor_parallel_training(recorder, rank, hcg)
    check_sequence_parallel(recorder, rank)
    check_load_state_dict(recorder, rank)
    recorder.write(out_dir_argument())
    # NOTE: on a machine loaded with other test runs, rank 0 once died of a segfault (exit -11) in
    # interpreter teardown, after writing its results. The cause is unknown. The unpatched_* checks
    # leave Paddle's CPU collectives after failed calls, which a training run never does, so both
    # ranks wait for each other and leave without teardown, and the results decide the test.
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def check_collectives(recorder: CheckRecorder, rank: int) -> None:
    from paddle.distributed.communication.reduce import ReduceOp

    inputs = [full_array(10 + r, [4, 3]) for r in range(2)]

    with recorder.check("all_reduce_avg") as result:
        tensor = paddle.to_tensor(inputs[rank])
        dist.all_reduce(tensor, op=ReduceOp.AVG)
        result["rel_diff"] = relative_difference(tensor.numpy(), (inputs[0] + inputs[1]) / 2)
    with recorder.check("unpatched_all_reduce_avg") as result:
        result["raised"] = error_text(
            original("paddle.distributed.all_reduce"), paddle.to_tensor(inputs[rank]), op=ReduceOp.AVG
        )

    total = inputs[0] + inputs[1]
    with recorder.check("reduce_scatter_tensor") as result:
        out = paddle.zeros([2, 3])
        dist.stream.reduce_scatter(out, paddle.to_tensor(inputs[rank]), sync_op=True)
        result["rel_diff"] = relative_difference(out.numpy(), total[2 * rank : 2 * rank + 2])
    with recorder.check("reduce_scatter_list_avg") as result:
        out = paddle.zeros([2, 3])
        parts = [paddle.to_tensor(inputs[rank][:2]), paddle.to_tensor(inputs[rank][2:])]
        dist.reduce_scatter(out, parts, op=ReduceOp.AVG)
        result["rel_diff"] = relative_difference(out.numpy(), total[2 * rank : 2 * rank + 2] / 2)
    with recorder.check("unpatched_reduce_scatter") as result:
        unpatched = original(
            "paddle.distributed.communication.stream.reduce_scatter._reduce_scatter_tensor_in_dygraph"
        )
        result["raised"] = error_text(
            unpatched, paddle.zeros([2, 3]), paddle.to_tensor(inputs[rank]), ReduceOp.SUM,
            dist.collective._get_global_group(), True, False,
        )


def check_mp_ops_unpatched(recorder: CheckRecorder, mp_group) -> None:
    x = paddle.to_tensor(full_array(20, [2, 4]))
    label = paddle.to_tensor(np.array([[1], [3]], dtype="int64"))
    calls = {
        "unpatched_c_identity": lambda: original("mp_ops._c_identity")(x, group=mp_group),
        "unpatched_mp_allreduce": lambda: original("mp_ops._mp_allreduce")(x.clone(), group=mp_group),
        "unpatched_c_concat": lambda: original("mp_ops._c_concat")(x, group=mp_group),
        "unpatched_c_split": lambda: original("mp_ops._c_split")(x, group=mp_group),
        "unpatched_c_softmax_with_cross_entropy": lambda: original("mp_ops._c_softmax_with_cross_entropy")(
            x, label, group=mp_group
        ),
    }
    for name, call in calls.items():
        with recorder.check(name) as result:
            result["raised"] = error_text(call)


def check_mlp(recorder: CheckRecorder, rank: int) -> None:
    """ColumnParallelLinear -> RowParallelLinear against two full Linear layers (c_identity, _mp_allreduce)."""
    from paddle.distributed.fleet.meta_parallel import ColumnParallelLinear, RowParallelLinear

    w1, b1 = full_array(30, [HIDDEN, FFN]), full_array(31, [FFN])
    w2, b2 = full_array(32, [FFN, HIDDEN]), full_array(33, [HIDDEN])
    x_full = full_array(34, [BATCH, SEQ, HIDDEN])
    part = slice(rank * FFN // 2, (rank + 1) * FFN // 2)

    with recorder.check("column_row_parallel_linear") as result:
        column = ColumnParallelLinear(HIDDEN, FFN, has_bias=True, gather_output=False)
        row = RowParallelLinear(FFN, HIDDEN, has_bias=True, input_is_parallel=True)
        column.weight.set_value(w1[:, part])
        column.bias.set_value(b1[part])
        row.weight.set_value(w2[part])
        row.bias.set_value(b2)
        x = paddle.to_tensor(x_full, stop_gradient=False)
        out = row(F.gelu(column(x)))
        out.square().mean().backward()

        ref_params = [paddle.to_tensor(a, stop_gradient=False) for a in (w1, b1, w2, b2)]
        ref_x = paddle.to_tensor(x_full, stop_gradient=False)
        ref_out = F.linear(F.gelu(F.linear(ref_x, ref_params[0], ref_params[1])), ref_params[2], ref_params[3])
        ref_out.square().mean().backward()
        result["rel_diff"] = max(
            relative_difference(out.numpy(), ref_out.numpy()),
            relative_difference(x.grad.numpy(), ref_x.grad.numpy()),
            relative_difference(column.weight.grad.numpy(), ref_params[0].grad.numpy()[:, part]),
            relative_difference(column.bias.grad.numpy(), ref_params[1].grad.numpy()[part]),
            relative_difference(row.weight.grad.numpy(), ref_params[2].grad.numpy()[part]),
            relative_difference(row.bias.grad.numpy(), ref_params[3].grad.numpy()),
        )


def check_gather_and_split(recorder: CheckRecorder, rank: int) -> None:
    """ColumnParallelLinear(gather_output=True) and RowParallelLinear(input_is_parallel=False): c_concat, c_split."""
    from paddle.distributed.fleet.meta_parallel import ColumnParallelLinear, RowParallelLinear

    w1, w2 = full_array(40, [HIDDEN, FFN]), full_array(41, [FFN, HIDDEN])
    x_full = full_array(42, [BATCH, SEQ, HIDDEN])
    part = slice(rank * FFN // 2, (rank + 1) * FFN // 2)

    with recorder.check("gather_output_and_split_input") as result:
        column = ColumnParallelLinear(HIDDEN, FFN, has_bias=False, gather_output=True)
        row = RowParallelLinear(FFN, HIDDEN, has_bias=False, input_is_parallel=False)
        column.weight.set_value(w1[:, part])
        row.weight.set_value(w2[part])
        x = paddle.to_tensor(x_full, stop_gradient=False)
        hidden = column(x)
        out = row(paddle.tanh(hidden))
        (out.square().mean() + hidden.mean()).backward()

        ref_w1 = paddle.to_tensor(w1, stop_gradient=False)
        ref_w2 = paddle.to_tensor(w2, stop_gradient=False)
        ref_x = paddle.to_tensor(x_full, stop_gradient=False)
        ref_hidden = paddle.matmul(ref_x, ref_w1)
        ref_out = paddle.matmul(paddle.tanh(ref_hidden), ref_w2)
        (ref_out.square().mean() + ref_hidden.mean()).backward()
        result["rel_diff"] = max(
            relative_difference(hidden.numpy(), ref_hidden.numpy()),
            relative_difference(out.numpy(), ref_out.numpy()),
            relative_difference(x.grad.numpy(), ref_x.grad.numpy()),
            relative_difference(column.weight.grad.numpy(), ref_w1.grad.numpy()[:, part]),
            relative_difference(row.weight.grad.numpy(), ref_w2.grad.numpy()[part]),
        )


def check_embedding(recorder: CheckRecorder, rank: int) -> None:
    from paddle.distributed.fleet.meta_parallel import VocabParallelEmbedding

    table = full_array(50, [VOCAB, HIDDEN])
    ids = np.random.default_rng(51).integers(0, VOCAB, [BATCH, SEQ])
    part = slice(rank * VOCAB // 2, (rank + 1) * VOCAB // 2)
    with recorder.check("vocab_parallel_embedding") as result:
        embedding = VocabParallelEmbedding(VOCAB, HIDDEN)
        embedding.weight.set_value(table[part])
        out = embedding(paddle.to_tensor(ids))
        (out * out).sum().backward()
        ref_table = paddle.to_tensor(table, stop_gradient=False)
        ref_out = F.embedding(paddle.to_tensor(ids), ref_table)
        (ref_out * ref_out).sum().backward()
        result["rel_diff"] = max(
            relative_difference(out.numpy(), ref_out.numpy()),
            relative_difference(embedding.weight.grad.numpy(), ref_table.grad.numpy()[part]),
        )


def check_cross_entropy(recorder: CheckRecorder, rank: int, mp_group) -> None:
    from paddle.distributed.fleet.meta_parallel import ParallelCrossEntropy

    logits = full_array(60, [BATCH, SEQ, VOCAB]) * 3
    labels = np.random.default_rng(61).integers(0, VOCAB, [BATCH, SEQ])
    labels[0, 1] = IGNORE_INDEX
    labels[1, 3] = IGNORE_INDEX
    part = slice(rank * VOCAB // 2, (rank + 1) * VOCAB // 2)

    with recorder.check("parallel_cross_entropy") as result:
        local_logits = paddle.to_tensor(logits[..., part], stop_gradient=False)
        loss = ParallelCrossEntropy(ignore_index=IGNORE_INDEX)(local_logits, paddle.to_tensor(labels))
        weights = paddle.to_tensor(full_array(62, [BATCH, SEQ, 1]))
        (loss * weights).sum().backward()

        ref_logits = paddle.to_tensor(logits, stop_gradient=False)
        ref_loss = F.cross_entropy(
            ref_logits, paddle.to_tensor(labels).unsqueeze(-1), reduction="none", ignore_index=IGNORE_INDEX
        )
        (ref_loss * weights).sum().backward()
        result["loss_shape"] = loss.shape
        result["rel_diff"] = max(
            relative_difference(loss.numpy(), ref_loss.numpy()),
            relative_difference(local_logits.grad.numpy(), ref_logits.grad.numpy()[..., part]),
        )

    with recorder.check("softmax_cross_entropy_return_softmax") as result:
        local_logits = paddle.to_tensor(logits[..., part])
        _, softmax = paddle.distributed.fleet.layers.mpu.mp_ops._c_softmax_with_cross_entropy(
            local_logits, paddle.to_tensor(labels), group=mp_group, return_softmax=True
        )
        result["rel_diff"] = relative_difference(softmax.numpy(), F.softmax(paddle.to_tensor(logits)).numpy()[..., part])


class FullModel(paddle.nn.Layer):
    """Embedding -> Linear -> GELU -> Linear -> vocabulary head, on full weights: the reference."""

    def __init__(self):
        super().__init__()
        self.embedding = paddle.nn.Embedding(VOCAB, HIDDEN)
        self.up = paddle.nn.Linear(HIDDEN, FFN)
        self.down = paddle.nn.Linear(FFN, HIDDEN)
        self.head = paddle.nn.Linear(HIDDEN, VOCAB, bias_attr=False)

    def forward(self, ids, labels):
        hidden = self.embedding(ids)
        hidden = hidden + self.down(F.gelu(self.up(hidden)))
        loss = F.cross_entropy(self.head(hidden), labels.unsqueeze(-1), reduction="none", ignore_index=IGNORE_INDEX)
        return loss.sum() / (labels != IGNORE_INDEX).astype("float32").sum()


class ParallelModel(paddle.nn.Layer):
    """The same model with fleet's tensor-parallel layers."""

    def __init__(self):
        super().__init__()
        from paddle.distributed.fleet import meta_parallel as mpu

        self.embedding = mpu.VocabParallelEmbedding(VOCAB, HIDDEN)
        self.up = mpu.ColumnParallelLinear(HIDDEN, FFN, has_bias=True, gather_output=False)
        self.down = mpu.RowParallelLinear(FFN, HIDDEN, has_bias=True, input_is_parallel=True)
        self.head = mpu.ColumnParallelLinear(HIDDEN, VOCAB, has_bias=False, gather_output=False)
        self.loss = mpu.ParallelCrossEntropy(ignore_index=IGNORE_INDEX)

    def forward(self, ids, labels):
        hidden = self.embedding(ids)
        hidden = hidden + self.down(F.gelu(self.up(hidden)))
        loss = self.loss(self.head(hidden), labels)
        return loss.sum() / (labels != IGNORE_INDEX).astype("float32").sum()


def check_tensor_parallel_training(recorder: CheckRecorder, rank: int, hcg, dp_rank: int = 0, dp_degree: int = 1) -> None:
    """Three AdamW steps with global-norm clipping through fleet.distributed_model/optimizer.

    With ``dp_degree > 1`` each data-parallel rank trains on its own batch and the reference on all
    of them, with the mean of the per-batch losses.
    """
    vocab_part = slice(rank * VOCAB // 2, (rank + 1) * VOCAB // 2)
    ffn_part = slice(rank * FFN // 2, (rank + 1) * FFN // 2)

    with recorder.check("tensor_parallel_training") as result:
        reference = FullModel()
        parallel = ParallelModel()
        full = {name: full_array(70 + i, p.shape) * 0.5 for i, (name, p) in enumerate(reference.named_parameters())}
        shards = {
            "embedding.weight": full["embedding.weight"][vocab_part],
            "up.weight": full["up.weight"][:, ffn_part],
            "up.bias": full["up.bias"][ffn_part],
            "down.weight": full["down.weight"][ffn_part],
            "down.bias": full["down.bias"],
            "head.weight": full["head.weight"][:, vocab_part],
        }
        for name, parameter in reference.named_parameters():
            parameter.set_value(full[name])
        for name, parameter in parallel.named_parameters():
            parameter.set_value(shards[name])

        def make_optimizer(model):
            return paddle.optimizer.AdamW(
                learning_rate=0.05, parameters=model.parameters(), weight_decay=0.01,
                grad_clip=paddle.nn.ClipGradByGlobalNorm(0.5),
            )

        ref_optimizer = make_optimizer(reference)
        model = fleet.distributed_model(parallel)
        optimizer = fleet.distributed_optimizer(make_optimizer(parallel))
        rng = np.random.default_rng(80)
        for _ in range(3):
            batches = []
            for _ in range(dp_degree):
                ids = rng.integers(0, VOCAB, [BATCH, SEQ])
                labels = rng.integers(0, VOCAB, [BATCH, SEQ])
                labels[0, 0] = IGNORE_INDEX
                batches.append((ids, labels))
            ids, labels = batches[dp_rank]
            # Rank 1 feeds different ids: TensorParallel must replace them with rank 0's before the forward.
            fed_ids = ids if rank == 0 else (ids + 1) % VOCAB
            loss = model(paddle.to_tensor(fed_ids), paddle.to_tensor(labels))
            loss.backward()
            optimizer.step()
            optimizer.clear_grad()

            ref_losses = [reference(paddle.to_tensor(i), paddle.to_tensor(l)) for i, l in batches]
            ref_loss = paddle.add_n(ref_losses) / dp_degree
            ref_loss.backward()
            ref_loss = ref_losses[dp_rank]
            ref_optimizer.step()
            ref_optimizer.clear_grad()

        differences = {"loss": relative_difference(loss.numpy(), ref_loss.numpy())}
        ref_values = {name: p.numpy() for name, p in reference.named_parameters()}
        ref_shards = {
            "embedding.weight": ref_values["embedding.weight"][vocab_part],
            "up.weight": ref_values["up.weight"][:, ffn_part],
            "up.bias": ref_values["up.bias"][ffn_part],
            "down.weight": ref_values["down.weight"][ffn_part],
            "down.bias": ref_values["down.bias"],
            "head.weight": ref_values["head.weight"][:, vocab_part],
        }
        for name, parameter in parallel.named_parameters():
            differences[name] = relative_difference(parameter.numpy(), ref_shards[name])
        result["differences"] = differences
        result["rel_diff"] = max(differences.values())

    with recorder.check("unpatched_tensor_parallel_broadcast") as result:
        result["raised"] = error_text(
            original("hybrid_parallel_util.broadcast_input_data"), hcg, paddle.to_tensor([1, 2])
        )


def check_sequence_parallel(recorder: CheckRecorder, rank: int) -> None:
    """ScatterOp -> ColumnSequenceParallelLinear -> RowSequenceParallelLinear -> GatherOp vs full Linear layers."""
    from paddle.distributed.fleet.utils import sequence_parallel_utils as spu

    w1, b1 = full_array(90, [HIDDEN, FFN]), full_array(91, [FFN])
    w2, b2 = full_array(92, [FFN, HIDDEN]), full_array(93, [HIDDEN])
    x_full = full_array(94, [SEQ, BATCH, HIDDEN])  # sequence parallel expects [s, b, h]
    part = slice(rank * FFN // 2, (rank + 1) * FFN // 2)

    with recorder.check("sequence_parallel_block") as result:
        column = spu.ColumnSequenceParallelLinear(HIDDEN, FFN, has_bias=True, gather_output=False)
        row = spu.RowSequenceParallelLinear(FFN, HIDDEN, has_bias=True, input_is_parallel=True)
        column.weight.set_value(w1[:, part])
        column.bias.set_value(b1[part])
        row.weight.set_value(w2[part])
        row.bias.set_value(b2)
        block = paddle.nn.LayerList([column, row])
        spu.mark_as_sequence_parallel_parameter(row.bias)
        spu.register_sequence_parallel_allreduce_hooks(block, accumulation_steps=1, fuse_sequence_parallel_allreduce=False)

        x = paddle.to_tensor(x_full, stop_gradient=False)
        local = spu.ScatterOp.apply(x)
        out = spu.GatherOp.apply(row(F.gelu(column(local))))
        out.square().mean().backward()

        ref = [paddle.to_tensor(a, stop_gradient=False) for a in (w1, b1, w2, b2)]
        ref_x = paddle.to_tensor(x_full, stop_gradient=False)
        ref_out = F.linear(F.gelu(F.linear(ref_x, ref[0], ref[1])), ref[2], ref[3])
        ref_out.square().mean().backward()
        result["rel_diff"] = max(
            relative_difference(out.numpy(), ref_out.numpy()),
            relative_difference(x.grad.numpy(), ref_x.grad.numpy()),
            relative_difference(column.weight.grad.numpy(), ref[0].grad.numpy()[:, part]),
            relative_difference(column.bias.grad.numpy(), ref[1].grad.numpy()[part]),
            relative_difference(row.weight.grad.numpy(), ref[2].grad.numpy()[part]),
            relative_difference(row.bias.grad.numpy(), ref[3].grad.numpy()),
        )


def check_load_state_dict(recorder: CheckRecorder, rank: int) -> None:
    """Save a ColumnParallelLinear's shards with dist.save_state_dict and load them as full tensors (TP2 -> replicated)."""
    import os

    from paddle.distributed.fleet.meta_parallel import ColumnParallelLinear

    path = os.path.join(out_dir_argument(), "checkpoint")
    weight, bias = full_array(110, [HIDDEN, FFN]), full_array(111, [FFN])
    part = slice(rank * FFN // 2, (rank + 1) * FFN // 2)
    saved = ColumnParallelLinear(HIDDEN, FFN, has_bias=True, gather_output=False)
    saved.weight.set_value(weight[:, part])
    saved.bias.set_value(bias[part])
    dist.save_state_dict(saved.sharded_state_dict(), path)
    dist.barrier()

    # Each rank needs the other rank's shard, so loading goes through the resharding exchange.
    with recorder.check("unpatched_load_state_dict") as result:
        target = {"weight": paddle.zeros([HIDDEN, FFN]), "bias": paddle.zeros([FFN])}
        result["raised"] = error_text(original("paddle.distributed.load_state_dict"), target, path)
    dist.barrier()
    with recorder.check("load_state_dict_resharded") as result:
        target = {"weight": paddle.zeros([HIDDEN, FFN]), "bias": paddle.zeros([FFN])}
        dist.load_state_dict(target, path)
        result["rel_diff"] = max(
            relative_difference(target["weight"].numpy(), weight),
            relative_difference(target["bias"].numpy(), bias),
        )


if __name__ == "__main__":
    main()
