"""The training loop: batches by sample index, accumulation, clipping, AdamW, eval, checkpoints.

Sample order is a pure function of ``consumed_samples``: optimizer step t reads the global batch of
samples [c, c + global_batch) with c = t * global_batch, and micro-batch m of data-parallel rank r
reads rows ``c + (m * dp_degree + r) * micro_batch`` onward. Resuming therefore needs only the step
number from the checkpoint to continue the same stream.
"""

import contextlib
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import numpy as np
import paddle
import paddle.distributed as dist
from tqdm import tqdm

from fleetlm.models.config import ModelConfig
from fleetlm.parallel.topology import Topology
from fleetlm.trainer import checkpoint as ckpt
from fleetlm.trainer.lr import build_lr_scheduler
from fleetlm.trainer.metrics import (
    MetricsWriter,
    flops_per_token,
    matmul_params,
    peak_memory_gib,
    resolve_peak_tflops,
)
from fleetlm.utils.log import get_logger

logger = get_logger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss or gradient norm of a step is NaN or infinite; raised before the optimizer step."""


@dataclass
class BatchPlan:
    """How one optimizer step's global batch is divided."""

    micro_batch_size: int
    accumulation_steps: int
    dp_degree: int
    seq_len: int

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.accumulation_steps * self.dp_degree

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_len


def read_batch(dataset, start: int, count: int):
    """Stack samples [start, start + count) into (input_ids, labels), each [count, seq_len] int64."""
    rows = np.stack([dataset[i] for i in range(start, start + count)]).astype("int64")
    return paddle.to_tensor(rows[:, :-1]), paddle.to_tensor(rows[:, 1:])


def decay_parameter_names(model: paddle.nn.Layer) -> set:
    """Names of parameters that get weight decay: matrices only, so norms and biases are excluded."""
    return {p.name for name, p in model.named_parameters() if len(p.shape) > 1 and "norm" not in name}


@paddle.no_grad()
def clip_grad_norm_(parameters: List[paddle.Tensor], max_norm: float) -> float:
    """Scale gradients in place so their global L2 norm is at most max_norm; return the norm before.

    The gradients must already be synchronised across data-parallel ranks (DataParallel does this in
    the last backward), so every rank computes the same norm locally.
    NOTE: with tensor, pipeline or sharding parallelism each rank holds a part of the gradients; the
    squared sums then need an all-reduce over those groups before the square root.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    squares = paddle.stack([paddle.sum(g.astype("float32") ** 2) for g in grads])
    norm = float(paddle.sqrt(paddle.sum(squares)))
    if max_norm > 0 and math.isfinite(norm):
        # Same guard as the usual clip_by_global_norm: divide by max(norm, max_norm).
        scale = max_norm / max(norm, max_norm)
        if scale < 1.0:
            for g in grads:
                g.scale_(scale)
    return norm


class Trainer:
    """Owns the model, optimizer and data of one run and executes the loop on every rank."""

    def __init__(
        self,
        args,
        model_config: ModelConfig,
        model: paddle.nn.Layer,
        topology: Topology,
        plan: BatchPlan,
        train_dataset,
        valid_dataset=None,
        test_dataset=None,
        run_config: Optional[Dict[str, Any]] = None,
    ):
        self.args = args.training
        self.model_config = model_config
        self.model = model
        self.topology = topology
        self.plan = plan
        self.train_dataset = train_dataset
        self.valid_dataset = valid_dataset
        self.test_dataset = test_dataset
        self.run_config = run_config or {}
        self.rank = topology.rank
        self.is_main = self.rank == 0

        self.scheduler = build_lr_scheduler(self.args)
        decay_names = decay_parameter_names(model)
        optimizer = paddle.optimizer.AdamW(
            learning_rate=self.scheduler,
            parameters=model.parameters(),
            beta1=self.args.adam_beta1,
            beta2=self.args.adam_beta2,
            epsilon=self.args.adam_epsilon,
            weight_decay=self.args.weight_decay,
            apply_decay_param_fun=lambda name: name in decay_names,
        )
        if topology.is_distributed:
            from paddle.distributed import fleet

            self.engine = fleet.distributed_model(model)
            self.optimizer = fleet.distributed_optimizer(optimizer)
        else:
            self.engine = model
            self.optimizer = optimizer

        self.step = 0
        self.consumed_samples = 0
        self.flops_per_token = flops_per_token(matmul_params(model, model_config.tie_word_embeddings))

    # ----------------------------------------------------------------- collectives

    def _barrier(self) -> None:
        if self.topology.is_distributed:
            dist.barrier()

    def _mean_over_dp(self, value: paddle.Tensor) -> float:
        """Average a scalar over data-parallel ranks (SUM then divide: gloo has no AVG)."""
        if self.plan.dp_degree > 1:
            value = value.clone()
            dist.all_reduce(value, group=self.topology.data_parallel_group())
            value = value / self.plan.dp_degree
        return float(value)

    # ----------------------------------------------------------------- checkpoints

    def resume(self, path: str) -> None:
        """Load model, optimizer (with LR schedule), RNG and data position from a checkpoint."""
        state = ckpt.read_trainer_state(path)
        self.model.set_state_dict(ckpt.load_state_file(path, ckpt.MODEL_STATE))
        self.optimizer.set_state_dict(ckpt.load_state_file(path, ckpt.OPTIMIZER_STATE))
        rng = ckpt.load_rng_state(path, self.rank)
        if rng is not None:
            ckpt.restore_rng_state(rng)
        else:
            logger.warning("%s has no RNG state for rank %d; dropout draws will differ", path, self.rank)
        self.step = state.step
        if state.consumed_samples != state.step * self.plan.global_batch_size:
            logger.warning(
                "checkpoint consumed %d samples in %d steps, but this run's global batch is %d; "
                "continuing from sample %d",
                state.consumed_samples, state.step, self.plan.global_batch_size, state.consumed_samples,
            )
        self.consumed_samples = state.consumed_samples
        logger.info("resumed from %s: step %d, %d samples consumed", path, self.step, self.consumed_samples)

    def save(self) -> None:
        main = self.is_main
        ckpt.save_checkpoint(
            self.args.output_dir,
            ckpt.TrainerState(self.step, self.consumed_samples, self.run_config.get("layout", {})),
            # Pure data parallel: every rank holds the same weights and moments, rank 0 writes them.
            model_state=self.model.state_dict() if main else None,
            optimizer_state=self.optimizer.state_dict() if main else None,
            run_config=self.run_config,
            rank=self.rank,
            barrier=self._barrier,
            save_total_limit=self.args.save_total_limit,
        )

    # ----------------------------------------------------------------- evaluation

    @paddle.no_grad()
    def evaluate(self, dataset, name: str) -> float:
        """Mean loss over eval_iters batches of the first samples of ``dataset`` (the same every time)."""
        self.engine.eval()
        batch = self.args.per_device_eval_batch_size
        dp, dp_rank = self.plan.dp_degree, self.topology.dp_rank
        total = paddle.zeros([], dtype="float32")
        for i in range(self.args.eval_iters):
            input_ids, labels = read_batch(dataset, (i * dp + dp_rank) * batch, batch)
            total += self.engine(input_ids, labels).astype("float32")
        self.engine.train()
        loss = self._mean_over_dp(total / self.args.eval_iters)
        return loss

    # ----------------------------------------------------------------- training

    def _train_step(self) -> Dict[str, float]:
        plan = self.plan
        dp_rank = self.topology.dp_rank
        accumulation = plan.accumulation_steps

        # Forward and backward over the micro-batches. Each micro-batch loss is a mean over its
        # micro_batch * seq_len tokens; dividing by the accumulation steps and letting DataParallel
        # average over dp ranks gives the mean over all global_batch * seq_len tokens, which is the
        # loss of one big batch (every sample has the same number of tokens, nothing is masked).
        step_loss = paddle.zeros([], dtype="float32")
        for micro in range(accumulation):
            start = self.consumed_samples + (micro * plan.dp_degree + dp_rank) * plan.micro_batch_size
            input_ids, labels = read_batch(self.train_dataset, start, plan.micro_batch_size)
            sync_now = micro == accumulation - 1
            no_sync = getattr(self.engine, "no_sync", None)
            context = no_sync() if (no_sync is not None and not sync_now) else contextlib.nullcontext()
            with context:
                loss = self.engine(input_ids, labels) / accumulation
                loss.backward()
            step_loss += loss.detach()

        # Check the loss and gradients before the optimizer touches the weights.
        loss_value = self._mean_over_dp(step_loss)
        if not math.isfinite(loss_value):
            raise NonFiniteLossError(
                f"loss is {loss_value} at step {self.step + 1}; the weights were not updated. "
                "Lower learning_rate, check the data, or resume from the last checkpoint."
            )
        grad_norm = clip_grad_norm_(self.model.parameters(), self.args.max_grad_norm)
        if not math.isfinite(grad_norm):
            raise NonFiniteLossError(
                f"gradient norm is {grad_norm} at step {self.step + 1} (loss {loss_value}); the weights were "
                "not updated. Lower learning_rate or resume from the last checkpoint."
            )

        # Optimizer and schedule.
        lr = self.optimizer.get_lr()
        self.optimizer.step()
        self.optimizer.clear_grad()
        self.scheduler.step()
        self.step += 1
        self.consumed_samples += plan.global_batch_size
        return {"loss": loss_value, "lr": lr, "grad_norm": grad_norm}

    def train(self) -> Dict[str, float]:
        """Run from self.step to max_steps; return the last metrics (loss, eval_loss when evaluated)."""
        args = self.args
        writer = MetricsWriter(args.output_dir, self.is_main, self.step if self.step > 0 else None)
        peak_tflops, peak_source = resolve_peak_tflops(args.peak_tflops)
        logger.info(
            "training: steps %d -> %d, global batch %d samples = %d tokens (micro %d x accumulation %d x dp %d), "
            "%.3g FLOPs/token, MFU peak %.3f TFLOPS/card from %s",
            self.step, args.max_steps, self.plan.global_batch_size, self.plan.tokens_per_step,
            self.plan.micro_batch_size, self.plan.accumulation_steps, self.plan.dp_degree,
            self.flops_per_token, peak_tflops, peak_source,
        )
        self.engine.train()
        last: Dict[str, float] = {}
        bar = tqdm(
            total=args.max_steps, initial=self.step, desc="train", unit="step",
            disable=args.disable_tqdm or not self.is_main, dynamic_ncols=True, mininterval=1.0,
        )
        # Throughput counts the time inside training steps only, not eval or checkpoint writes.
        interval_time, interval_steps = 0.0, 0
        while self.step < args.max_steps:
            step_start = time.perf_counter()
            metrics = self._train_step()
            interval_time += time.perf_counter() - step_start
            interval_steps += 1
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}")

            if self.step % args.logging_steps == 0 or self.step == args.max_steps:
                tokens_per_s = self.plan.tokens_per_step * interval_steps / interval_time
                per_card = tokens_per_s / self.topology.world_size
                tflops = per_card * self.flops_per_token / 1e12
                memory, _ = peak_memory_gib()
                record = {
                    "step": self.step,
                    "loss": metrics["loss"],
                    "lr": metrics["lr"],
                    "grad_norm": metrics["grad_norm"],
                    "tokens_per_s": tokens_per_s,
                    "tokens_per_card_per_s": per_card,
                    "tflops_per_card": tflops,
                    "mfu": tflops / peak_tflops if peak_tflops > 0 else None,
                    "peak_memory_gib": memory,
                    "consumed_samples": self.consumed_samples,
                }
                writer.write(record)
                mfu = f"{100 * record['mfu']:.1f}%" if record["mfu"] is not None else "n/a"
                logger.info(
                    "step %d/%d | loss %.4f | lr %.3e | grad_norm %.3f | %.0f tokens/s | %.0f tokens/card/s | "
                    "%.3f TFLOPS/card | MFU %s | peak mem %.2f GiB",
                    self.step, args.max_steps, record["loss"], record["lr"], record["grad_norm"], tokens_per_s,
                    per_card, tflops, mfu, memory,
                )
                interval_time, interval_steps = 0.0, 0
            last = metrics

            if args.do_eval and self.valid_dataset is not None and (
                self.step % args.eval_steps == 0 or self.step == args.max_steps
            ):
                eval_loss = self.evaluate(self.valid_dataset, "valid")
                writer.write({"step": self.step, "eval_loss": eval_loss})
                logger.info("step %d | eval loss %.4f | eval ppl %.2f", self.step, eval_loss, math.exp(min(eval_loss, 50)))
                last["eval_loss"] = eval_loss

            if args.save_steps > 0 and (self.step % args.save_steps == 0 or self.step == args.max_steps):
                self.save()
        bar.close()

        if args.do_predict and self.test_dataset is not None:
            test_loss = self.evaluate(self.test_dataset, "test")
            writer.write({"step": self.step, "test_loss": test_loss})
            logger.info("test loss %.4f | test ppl %.2f", test_loss, math.exp(min(test_loss, 50)))
            last["test_loss"] = test_loss
        return last
