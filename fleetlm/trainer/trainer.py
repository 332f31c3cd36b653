"""The training loop: batches by sample index, accumulation, clipping, AdamW, eval, checkpoints.

Sample order is a pure function of ``consumed_samples``: optimizer step t reads the global batch of
samples [c, c + global_batch) with c = t * global_batch, and micro-batch m of data-parallel rank r
reads rows ``c + (m * dp_degree + r) * micro_batch`` onward, where r counts the ranks that read
different samples (data-parallel x sharding). Tensor-parallel ranks and pipeline stages of one
replica read the same rows. Resuming therefore needs only the step number from the checkpoint to
continue the same stream, in any layout with the same global batch.

The parallel layout itself (tensor, pipeline, sharding, recompute) is applied by
``fleetlm.parallel.engine.parallelize``; this module only drives it.
"""

import contextlib
import math
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, Optional

import numpy as np
import paddle
import paddle.distributed as dist
from tqdm import tqdm

from fleetlm.models.config import ModelConfig
from fleetlm.parallel.clip import NonFiniteGradientError
from fleetlm.parallel.engine import ParallelOptions, parallelize
from fleetlm.parallel.topology import Topology
from fleetlm.trainer import checkpoint as ckpt
from fleetlm.trainer import interrupt
from fleetlm.trainer import precision as amp
from fleetlm.trainer import sharded_checkpoint as shards
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
    """Division of one optimizer step's global batch into micro-batches and data-parallel ranks."""

    micro_batch_size: int
    accumulation_steps: int
    dp_degree: int  # ranks that read different samples: data-parallel x sharding degree
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
        options: Optional[ParallelOptions] = None,
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
        self.options = options or ParallelOptions()
        # FLOPs of the whole model, counted before tensor parallelism splits it.
        self.flops_per_token = flops_per_token(matmul_params(model, model_config.tie_word_embeddings))

        self.scheduler = build_lr_scheduler(self.args)
        self.precision = amp.select_precision(self.args.bf16, self.args.fp16)
        t = self.args

        def make_optimizer(parameters, apply_decay, clip):
            optimizer = paddle.optimizer.AdamW(
                learning_rate=self.scheduler,
                parameters=parameters,
                beta1=t.adam_beta1,
                beta2=t.adam_beta2,
                epsilon=t.adam_epsilon,
                weight_decay=t.weight_decay,
                apply_decay_param_fun=apply_decay,
                grad_clip=clip,
            )
            return optimizer

        self.parallel = parallelize(
            model, model_config.model_type, topology, self.options, make_optimizer, t.max_grad_norm,
            decorate=lambda module, optimizer: amp.decorate(module, optimizer, self.precision),
        )
        self.engine = self.parallel.engine
        self.optimizer = self.parallel.optimizer
        self.scaler = amp.make_scaler(self.precision, topology.is_distributed)

        self.step = 0
        self.consumed_samples = 0

    # ----------------------------------------------------------------- collectives

    def _barrier(self) -> None:
        if self.topology.is_distributed:
            dist.barrier()

    def _mean_over_data_parallel(self, value: paddle.Tensor) -> float:
        """Average a scalar over the ranks that read different samples (SUM then divide: gloo has no AVG)."""
        if self.plan.dp_degree > 1:
            value = value.clone().reshape([1])
            for group in self.topology.data_parallel_groups():
                dist.all_reduce(value, group=group)
            value = value / self.plan.dp_degree
        return float(value.reshape([]))

    # ----------------------------------------------------------------- checkpoints

    def _describe_layouts(self, saved: Dict[str, Any]) -> str:
        return f"saved layout {saved or 'unknown'}, requested layout {self.run_config.get('layout', {})}"

    def _uses_dropout(self) -> bool:
        """Return True when a dropout probability is above 0, so random draws affect training."""
        config = self.model_config
        return config.hidden_dropout_prob > 0 or config.attention_probs_dropout_prob > 0

    def resume(self, path: str) -> None:
        """Load model, optimizer (with LR schedule), RNG and data position from a checkpoint of any layout."""
        state = ckpt.read_trainer_state(path)
        spans = None
        if self.parallel.sharding_stage == 3:
            spans = shards.stage3_spans(self.parallel.parameters, self.engine, self.topology.sharding_rank)
        shards.load_resharded(
            path,
            self.parallel.parameters,
            self.parallel.inner_optimizer,
            self.scheduler,
            self.topology.tp_rank,
            self.topology.layout.tp_degree,
            self._describe_layouts(state.layout),
            spans,
        )

        rng = ckpt.load_rng_state(path, self.rank)
        if rng is not None and state.layout.get("world_size", self.topology.world_size) == self.topology.world_size:
            ckpt.restore_rng_state(rng)
        elif self._uses_dropout():
            logger.warning("%s has no RNG state for rank %d in this layout; dropout draws will differ", path, self.rank)

        self.step = state.step
        if state.consumed_samples != state.step * self.plan.global_batch_size:
            logger.warning(
                "checkpoint consumed %d samples in %d steps, but this run's global batch is %d; "
                "continuing from sample %d",
                state.consumed_samples, state.step, self.plan.global_batch_size, state.consumed_samples,
            )
        self.consumed_samples = state.consumed_samples

        # The saved scheduler state contains the rate of the old schedule, so recompute it for this run's
        # arguments (max_steps or decay_steps may have changed).
        self.scheduler.last_epoch = state.step - 1
        self.scheduler.step()
        logger.info(
            "resumed from %s: step %d, %d samples consumed (%s)",
            path, self.step, self.consumed_samples, self._describe_layouts(state.layout),
        )

    def save(self) -> None:
        topology, layout = self.topology, self.topology.layout
        parameters = self.parallel.parameters
        replica_zero = topology.hcg is None or topology.hcg.get_data_parallel_rank() == 0
        stage3 = self.parallel.sharding_stage == 3
        slices = shards.stage3_slices(parameters, self.engine, topology.sharding_rank) if stage3 else None
        files = {}
        if replica_zero and (stage3 or topology.sharding_rank == 0):
            name = shards.model_file_name(layout, topology.tp_rank, topology.pp_rank,
                                          topology.sharding_rank if stage3 else None)
            files[name] = shards.model_shard(parameters, layout, topology.tp_rank, slices)
        if replica_zero:
            name = shards.optimizer_file_name(topology.tp_rank, topology.pp_rank, topology.sharding_rank)
            files[name] = shards.optimizer_shard(
                parameters, self.parallel.inner_optimizer, self.scheduler, layout, topology.tp_rank, slices
            )
        ckpt.save_checkpoint(
            self.args.output_dir,
            ckpt.TrainerState(self.step, self.consumed_samples, self.run_config.get("layout", {})),
            files=files,
            run_config=self.run_config,
            rank=self.rank,
            barrier=self._barrier,
            save_total_limit=self.args.save_total_limit,
        )

    # ----------------------------------------------------------------- batches

    def _rows(self, start: int, micro: int) -> int:
        """First sample of micro-batch ``micro`` of this rank in the global batch starting at ``start``."""
        return start + (micro * self.plan.dp_degree + self.topology.dp_rank) * self.plan.micro_batch_size

    def _pipeline_batch(self, dataset, start: int, micro_batches: int, micro_batch_size: int):
        """Stack this rank's micro-batches in schedule order into [micro_batches * micro_batch_size, s]."""
        parts = [
            read_batch(dataset, start + (m * self.plan.dp_degree + self.topology.dp_rank) * micro_batch_size,
                       micro_batch_size)
            for m in range(micro_batches)
        ]
        return paddle.concat([p[0] for p in parts]), paddle.concat([p[1] for p in parts])

    # ----------------------------------------------------------------- evaluation

    @paddle.no_grad()
    def evaluate(self, dataset, name: str) -> float:
        """Mean loss over eval_iters batches of the first samples of ``dataset`` (the same every time)."""
        interrupt.activate()
        batch, iters = self.args.per_device_eval_batch_size, self.args.eval_iters
        if self.parallel.is_pipeline:
            # One pipelined pass over all eval batches: micro-batch i is eval batch i, and the
            # pipeline's mean of micro-batch means is the mean over the eval batches.
            engine = self.engine
            saved = engine.accumulate_steps, engine.micro_batch_size
            engine.accumulate_steps, engine.micro_batch_size = iters, batch
            try:
                data = list(self._pipeline_batch(dataset, 0, iters, batch))
                with amp.autocast(self.precision):
                    total = engine.eval_batch(data, compute_loss=True)
            finally:
                engine.accumulate_steps, engine.micro_batch_size = saved
            self.engine.train()
            return self._mean_over_data_parallel(total.astype("float32"))

        self.engine.eval()
        total = paddle.zeros([], dtype="float32")
        for i in range(iters):
            input_ids, labels = read_batch(dataset, (i * self.plan.dp_degree + self.topology.dp_rank) * batch, batch)
            with amp.autocast(self.precision):
                total += self.engine(input_ids, labels).astype("float32")
        self.engine.train()
        return self._mean_over_data_parallel(total / iters)

    # ----------------------------------------------------------------- training

    def _forward_backward(self) -> paddle.Tensor:
        """Run the step's micro-batches forward and backward; return this rank's mean loss."""
        plan = self.plan
        accumulation = plan.accumulation_steps
        if self.parallel.is_pipeline:
            # Fleet's 1F1B (or interleaved) schedule splits the stacked batch into the micro-batches
            # and returns the mean of their losses, broadcast from the last stage to every stage.
            data = list(self._pipeline_batch(self.train_dataset, self.consumed_samples, accumulation,
                                             plan.micro_batch_size))
            engine = self.engine
            data = engine._prepare_training(data, self.optimizer, None)
            engine.loss_fn_idx = 0
            with amp.autocast(self.precision):
                return engine.forward_backward_pipeline(data, self.scaler).reshape([])

        # Each micro-batch loss is a mean over its micro_batch * seq_len tokens; dividing by the
        # accumulation steps and averaging over the data-parallel ranks (fleet or group-sharded
        # reduction) gives the mean over all global_batch * seq_len tokens, the loss of one big batch
        # (every sample has the same number of tokens, nothing is masked).
        step_loss = paddle.zeros([], dtype="float32")
        no_sync = self.engine.no_sync if isinstance(self.engine, paddle.DataParallel) else None
        for micro in range(accumulation):
            input_ids, labels = read_batch(self.train_dataset, self._rows(self.consumed_samples, micro),
                                           plan.micro_batch_size)
            sync_now = micro == accumulation - 1
            context = no_sync() if (no_sync is not None and not sync_now) else contextlib.nullcontext()
            with context:
                with amp.autocast(self.precision):
                    loss = self.engine(input_ids, labels).astype("float32") / accumulation
                if self.scaler is not None:
                    self.scaler.scale(loss).backward()
                else:
                    loss.backward()
            step_loss += loss.detach()
        return step_loss

    def _train_step(self) -> Dict[str, float]:
        # Forward and backward.
        loss_value = self._mean_over_data_parallel(self._forward_backward())

        # Check the loss before the optimizer touches the weights.
        if not math.isfinite(loss_value):
            raise NonFiniteLossError(
                f"loss is {loss_value} at step {self.step + 1}; the weights were not updated. "
                "Lower learning_rate, check the data, or resume from the last checkpoint."
            )

        # Optimizer step. The clip inside it measures the global gradient norm over all shards and
        # raises before any update when the norm is not finite.
        self.parallel.sync_sequence_parallel_gradients()
        lr = self.optimizer.get_lr()
        self.parallel.clip.last_norm = None
        try:
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
        except NonFiniteGradientError as e:
            raise NonFiniteLossError(
                f"{e} at step {self.step + 1} (loss {loss_value}); the weights were not updated. "
                "Lower learning_rate or resume from the last checkpoint."
            ) from None
        grad_norm = self.parallel.clip.last_norm
        if grad_norm is None:
            # Only fp16 gets here: the loss scaler found inf/NaN gradients and skipped the update.
            logger.warning("step %d: fp16 loss scaler skipped the update (inf/NaN gradients)", self.step + 1)
            grad_norm = float("nan")
        self.optimizer.clear_grad()

        # Schedule.
        self.scheduler.step()
        self.step += 1
        self.consumed_samples += self.plan.global_batch_size
        return {"loss": loss_value, "lr": lr, "grad_norm": grad_norm}

    def train(self) -> Dict[str, float]:
        """Run from self.step to max_steps; return the last metrics (loss, eval_loss when evaluated)."""
        interrupt.activate()
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
        # Under the launcher stderr is a log file: redraw the bar only every 30 s there, so the
        # log gets a progress line now and then instead of one per step.
        bar = tqdm(
            total=args.max_steps, initial=self.step, desc="train", unit="step",
            disable=args.disable_tqdm or not self.is_main, dynamic_ncols=True,
            mininterval=1.0 if sys.stderr.isatty() else 30.0,
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

            # A deferred SIGINT or SIGTERM on any rank stops every rank here, after the same step.
            signal_number = interrupt.stop_requested(self.topology.is_distributed)
            if signal_number is not None:
                bar.close()
                raise interrupt.RunInterrupted(signal_number)
        bar.close()

        if args.do_predict and self.test_dataset is not None:
            test_loss = self.evaluate(self.test_dataset, "test")
            writer.write({"step": self.step, "test_loss": test_loss})
            logger.info("test loss %.4f | test ppl %.2f", test_loss, math.exp(min(test_loss, 50)))
            last["test_loss"] = test_loss
        return last
