"""The training loop: each rank trains on its slice of the global batch, gradients are averaged, and
every step boundary is a place where the ranks can agree to save or stop.

The loop chooses nothing: the task, data, model, optimizer and schedule come built from the config
(parts.py), a checkpoint holds whatever is in `stateful`, and deliberate faults hook in from outside
(drills.py) through `after_step` and `before_save`.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from hpcml.compute import checkpoint as ckpt
from hpcml.compute.data import GlobalBatchStream, eval_batches
from hpcml.compute.dist import DistributedContext, broadcast_from_rank0, same_on_every_rank
from hpcml.compute.fsdp import whole
from hpcml.compute.gradsync import make_gradient_sync
from hpcml.compute.loader import BatchSource
from hpcml.compute.loss_watch import NonFiniteLossWatch
from hpcml.compute.metrics import MetricsWriter, StepMetricsAverager, mean_over_micro_batches
from hpcml.compute.parts import RunParts, build_optimizer, build_parts, build_scheduler
from hpcml.compute.precision import Precision
from hpcml.compute.preempt import BoundaryDecision, StopCoordinator, StopReason
from hpcml.compute.run_checkpoints import RunCheckpoints
from hpcml.compute.run_result import TrainingResult, parameters_checksum, write_result
from hpcml.compute.stall_report import StallReport
from hpcml.compute.step_gc import StepAlignedGC
from hpcml.compute.tasks import split_step_output
from hpcml.config import TrainJobConfig
from hpcml.errors import ConfigError, DataError
from hpcml.signal_names import parse_signal

__all__ = ["Trainer", "TrainingOutcome", "TrainingResult", "parameters_checksum"]

log = logging.getLogger(__name__)

# Until a save has been timed, the deadline check assumes one takes this long.
INITIAL_SAVE_ESTIMATE_S = 5.0

Hook = Callable[["Trainer"], None]


@dataclass
class TrainedSteps:
    """How the loop ended: stopped early (and saved) for a reason, or NONE; the last step's loss."""

    stopped: StopReason
    last_loss: torch.Tensor
    # Unix time at which this process finished its first training step (start-up and resume benchmarks).
    first_step_at: float | None


@dataclass(frozen=True)
class TrainingOutcome:
    """Either a finished run (result) or one that stopped early, saved, for a reason."""

    result: TrainingResult | None
    stopped: StopReason
    step: int


class Trainer:
    def __init__(
        self,
        cfg: TrainJobConfig,
        ctx: DistributedContext,
        stop: StopCoordinator | None = None,
        parts: RunParts | None = None,
    ):
        self.cfg = cfg
        self.ctx = ctx
        self.stop = stop
        self.output_dir = Path(broadcast_from_rank0(str(Path(cfg.train.output_dir).resolve()), ctx))
        self.checkpoint_dir = (
            Path(cfg.checkpoint.dir).resolve() if cfg.checkpoint.dir else self.output_dir / "checkpoints"
        )
        parts = parts or build_parts(cfg, ctx.device)
        self.task, self.model, self.collate = parts.task, parts.model, parts.collate
        self.train_data, self.eval_data = parts.train_data, parts.eval_data
        self.stream = GlobalBatchStream(
            same_on_every_rank(len(self.train_data), "data.train's length", ctx),
            cfg.train.global_batch_size,
            cfg.train.seed,
        )
        self.stream.micro_batches(0, ctx.rank, ctx.world_size, cfg.train.grad_accum_steps)  # refuses a bad split
        self.batches = BatchSource(
            self.train_data,
            self.stream,
            ctx.rank,
            ctx.world_size,
            ctx.device,
            cfg.train.seed,
            cfg.loader,
            cfg.train.steps,
            self.collate,
            stop_signals=(signal.SIGTERM, parse_signal(cfg.preempt.signal)),
            micro_batches=cfg.train.grad_accum_steps,
        )
        self.sync = make_gradient_sync(self.model, ctx, cfg.train)
        # What each micro-batch runs forward through: the sync's module, compiled if asked.
        self.forward_module = torch.compile(self.sync.module) if cfg.train.compile else self.sync.module
        self.optimizer = build_optimizer(cfg, self.model.parameters())
        self.scheduler = build_scheduler(cfg, self.optimizer)
        self.precision = Precision(cfg.train.precision, ctx.device)
        # The last step's gradient norm before clipping (train.clip_grad_norm), logged with the step metrics.
        self.grad_norm: torch.Tensor | None = None
        # Everything a checkpoint holds, by name: each has state_dict() and load_state_dict().
        self.stateful: dict[str, Any] = {
            "model": self.model,
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
            "grad_sync": self.sync,
            "data_stream": self.stream,
        }
        if self.precision.scaler is not None:
            self.stateful["grad_scaler"] = self.precision
        if hasattr(self.task, "state_dict") and hasattr(self.task, "load_state_dict"):
            self.stateful["task"] = self.task
        self.loss_watch = NonFiniteLossWatch(ctx, cfg.train.dist_timeout_s)
        # A step still running half-way to the collective timeout is a hang in the making: its stacks are logged.
        self.stall_report = StallReport(cfg.train.dist_timeout_s / 2)
        # Garbage collected at the same step boundaries on every rank while fit's loop runs; automatically
        # during an evaluation and after the loop.
        self.step_gc = StepAlignedGC(cfg.train.gc_every_steps)
        self.step_metrics = StepMetricsAverager(ctx, type(self.task).__name__)
        self.checkpoints = RunCheckpoints(
            cfg.checkpoint, ctx, self.checkpoint_dir, self.stateful, collective_timeout_s=cfg.train.dist_timeout_s
        )
        # Called with the trainer after each step, between a step's micro-batches, and at each save before any
        # state is written (drills.py); empty in a normal run.
        self.after_step: list[Hook] = []
        self.before_save: list[Hook] = []
        self.between_micro_batches: list[Hook] = []
        # A forward that updates buffers (BatchNorm statistics) changes checkpointed state.
        self._forward_changes_state = any(True for _ in self.model.buffers())
        self.step = 0
        self.resumed_from: int | None = None
        self._last_save_time = time.monotonic()
        self._save_estimate_s = INITIAL_SAVE_ESTIMATE_S
        self._step_estimate_s = 0.0
        self._eval_estimate_s = 0.0

    # ------------------------------------------------------------ collectives

    def _barrier(self) -> None:
        if self.ctx.world_size > 1:
            dist.barrier()

    # ------------------------------------------------------------ checkpoints

    def resume(self) -> None:
        loaded = self.checkpoints.choose()
        if loaded is None:
            return
        path, manifest = loaded.path, loaded.manifest
        batch = self.cfg.train.global_batch_size
        if manifest["global_batch_size"] != batch:
            raise ConfigError(
                f"{path} was written with train.global_batch_size={manifest['global_batch_size']}, this run uses "
                f"{batch}; an exact resume needs the same global batch. Set it back, or checkpoint.resume=none."
            )
        self.checkpoints.restore(loaded)
        if loaded.rng_state is not None:
            ckpt.restore_rng_state(loaded.rng_state)
        # The data position is a count of global samples, so any world size continues the same stream.
        self.step = loaded.samples_consumed // batch
        self.resumed_from = self.step
        log.info(
            "resumed from %s (step %d, %d samples; written by %d ranks, %s, now %d)",
            path,
            self.step,
            loaded.samples_consumed,
            manifest["world_size"],
            loaded.layout,
            self.ctx.world_size,
        )

    def save(self, wait: bool = False) -> None:
        """Every rank calls this at the same step boundary."""
        # A NaN from any rank has reached every replica through the gradient average: never save it.
        self.loss_watch.check(self.step)
        for hook in self.before_save:
            hook(self)
        header = {
            "samples_consumed": self.stream.samples_consumed(self.step),
            "global_batch_size": self.cfg.train.global_batch_size,
            "world_size": self.ctx.world_size,
        }
        # The deadline check needs the whole cost of a save: stall plus (for async) the write. Rank 0's own
        # figure: only its clock decides a deadline (preempt.StopCoordinator), and it waits for every rank's
        # shard before committing. No collective here: an asynchronous save holds training for its copy alone.
        self._save_estimate_s = self.checkpoints.save(self.step, header, wait)
        self._last_save_time = time.monotonic()

    def periodic_save_due(self) -> bool:
        """Whether checkpoint.every_steps or checkpoint.every_minutes asks for a save at this step."""
        c = self.cfg.checkpoint
        by_steps = c.every_steps > 0 and self.step % c.every_steps == 0
        # Rank 0's clock alone, as for deadlines (the ranks' wishes are OR-ed): the others may return from a
        # save before rank 0 has written it, and would count the minutes from then.
        by_time = (
            self.ctx.is_main and c.every_minutes > 0 and time.monotonic() - self._last_save_time >= 60 * c.every_minutes
        )
        return by_steps or by_time

    # ------------------------------------------------------------ the loop

    def batch(self, step: int, peek: bool = False) -> Any:
        """This rank's share of global batch `step`, on its device; `peek` reads it without advancing the
        loader (the settling step reads the batch the first real step then trains on)."""
        try:
            return self.batches.peek(step) if peek else self.batches.next_batch(step)
        except Exception as err:
            raise DataError(
                f"data.train failed on rank {self.ctx.rank} at step {step + 1}, reading its batch: {err!r}"
            ) from err

    def loss_and_metrics(self, module: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, Any]:
        return split_step_output(self.task.training_step(module, batch), f"{type(self.task).__name__}.training_step")

    def train_step(self) -> tuple[torch.Tensor, Any]:
        """One step: the task's loss on each of this rank's micro-batches (one, without accumulation), their
        gradients summed locally and averaged across ranks once, after the last; clipped by their global norm
        if asked; the optimizer and schedule stepped. Returns the loss (detached) and the task's step metrics,
        each the mean over the micro-batches."""
        micro_batches = self.batch(self.step)
        count = len(micro_batches)
        self.sync.zero_grad(self.optimizer)
        if self._forward_changes_state:
            self.checkpoints.wait_staged()
        losses, step_metrics = [], []
        for i, batch in enumerate(micro_batches):
            last = i == count - 1
            with contextlib.nullcontext() if last else self.sync.no_sync():
                with self.precision.autocast():
                    loss, metrics = self.loss_and_metrics(self.forward_module, batch)
                self.loss_watch.observe(loss, self.step + 1)
                # Each micro-batch's mean loss weighs 1/count: the sum is the mean over the rank's share.
                self.sync.backward(self.precision.scale(loss / count if count > 1 else loss))
            losses.append(loss.detach())
            step_metrics.append(metrics)
            if not last:
                for hook in self.between_micro_batches:
                    hook(self)
        self.sync.synchronize()
        self.checkpoints.wait_staged()
        if self.cfg.train.clip_grad_norm:
            self.precision.unscale_(self.optimizer)
            # Under FSDP the norm is over every rank's shards (a DTensor, reduced across them).
            self.grad_norm = whole(
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.clip_grad_norm)
            )
        self.precision.step(self.optimizer)
        self.scheduler.step()
        self.step += 1
        for hook in self.after_step:
            hook(self)
        if count == 1:
            return losses[0], step_metrics[0]
        return torch.stack(losses).mean(), mean_over_micro_batches(step_metrics, type(self.task).__name__)

    def settle(self) -> None:
        """Before the first step of a run or a resume: the gradient sync lays out its buffers and chooses its
        transports on this step's batch, and rank 0 allocates its checkpoint staging buffers.

        The throwaway step leaves no trace: random draws (dropout, a Dataset's augmentation) and the task's
        own state are put back, or a resumed run would differ from the uninterrupted one from here on.
        """
        rng = ckpt.capture_rng_state()
        task_state = copy.deepcopy(self.task.state_dict()) if "task" in self.stateful else None
        batch = self.batch(self.step, peek=True)
        with self.precision.autocast():
            self.sync.settle(lambda module: self.loss_and_metrics(module, batch)[0])
        ckpt.restore_rng_state(rng)
        if task_state is not None:
            self.task.load_state_dict(task_state)
        self.checkpoints.prepare()

    def evaluates_after(self, step: int) -> bool:
        """Whether the loop evaluates after `step` (train.eval_every_steps; the last step's is the final one)."""
        every = self.cfg.train.eval_every_steps
        return bool(every) and step % every == 0 and step < self.cfg.train.steps

    def boundary_decision(self) -> BoundaryDecision:
        """Whether to stop or save after this step, the same on every rank (a collective: every rank calls it)."""
        save_due = self.periodic_save_due()
        if self.stop is None:
            return BoundaryDecision(StopReason.NONE, save_due)
        # The deadline must leave room for the next step, and for the evaluation after it if one is due.
        next_step_s = self._step_estimate_s + (self._eval_estimate_s if self.evaluates_after(self.step + 1) else 0.0)
        return self.stop.agree(self._save_estimate_s, next_step_s, save_due)

    def global_mean(self, value: torch.Tensor) -> float:
        if self.ctx.world_size > 1:
            value = value.clone()
            dist.all_reduce(value)
            value /= self.ctx.world_size
        return float(value)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The task's metrics on the eval dataset, computed alike on every rank; {} without one."""
        if self.eval_data is None:
            return {}
        # An evaluation draws nothing from the training's random streams: a run that evaluates every N steps
        # trains exactly as one that does not, and a resume needs no record of evaluations.
        # Each module's own mode comes back afterwards, not train() everywhere: a user may keep parts frozen in
        # eval mode (BatchNorm statistics, dropout), and an evaluation mid-run must not unfreeze them.
        rng, modes = ckpt.capture_rng_state(), {m: m.training for m in self.model.modules()}
        self.model.eval()
        try:
            batches = eval_batches(self.eval_data, self.cfg.train.eval_batch_size, self.ctx.device, self.collate)
            with self.precision.autocast():
                found = self.task.evaluate(self.model, batches)
        finally:
            for module, training in modes.items():
                module.training = training
            ckpt.restore_rng_state(rng)
        try:
            # Numbers of any kind: floats, numpy scalars, one-element tensors.
            return {str(k): float(v) for k, v in found.items()}
        except (AttributeError, TypeError, ValueError, RuntimeError):
            raise TypeError(
                f"{type(self.task).__name__}.evaluate must return a dict of numbers; got {found!r}."
            ) from None

    def fit(self) -> TrainingOutcome:
        """Resume from the latest checkpoint if there is one, train until train.steps or until the ranks agree
        to stop (then save and return), save the final state, evaluate, and write the result."""
        self.resume()
        first_step = self.step
        if self.step < self.cfg.train.steps:
            self.settle()
        metrics = MetricsWriter(self.output_dir, self.ctx.is_main, self.cfg.train.steps, self.step)
        started = time.perf_counter()
        try:
            self.step_gc.start()
            trained = self.train_until_done(metrics)
            self.step_gc.close()
            self.stall_report.close()  # the final save and evaluation are no step
            if trained.stopped is not StopReason.NONE:
                self.checkpoints.close()
                return TrainingOutcome(None, trained.stopped, self.step)
            elapsed = time.perf_counter() - started
            if self.resumed_from != self.step:
                # The final state, saved before evaluating: a finished run that is requeued does not retrain,
                # and an evaluate() that fails loses nothing (a rerun resumes at the end and evaluates again).
                self.save(wait=True)
            evaluated = self.evaluate()
            if evaluated:
                metrics.write(self.step, evaluated)
            self.checkpoints.close()  # the old checkpoints were deleted while it evaluated
        finally:
            self.step_gc.close()
            self.stall_report.close()
            metrics.close()
            self.batches.close()
        result = TrainingResult(
            steps=self.step,
            final_loss=self.global_mean(trained.last_loss),
            metrics=evaluated,
            params_sha256="",
            world_size=self.ctx.world_size,
            num_nodes=self.ctx.placement.num_nodes,
            backend=self.ctx.backend,
            grad_sync=self.cfg.train.grad_sync,
            launcher=self.ctx.launcher,
            samples_per_s=(self.step - first_step) * self.cfg.train.global_batch_size / max(elapsed, 1e-9),
            elapsed_s=elapsed,
            output_dir=str(self.output_dir),
            resumed_from_step=self.resumed_from,
            transport_plan=self.sync.state_dict().get("transport_plan"),
            first_step_at=trained.first_step_at,
        )
        result = write_result(result, self.model, self.ctx, self.output_dir)
        return TrainingOutcome(result, StopReason.NONE, self.step)

    def train_until_done(self, metrics: MetricsWriter) -> TrainedSteps:
        """Steps until train.steps, logging every train.log_every; at each step boundary the ranks agree
        whether to save, or to stop (then the state is saved, and the loop ends early)."""
        cfg = self.cfg.train
        trained = TrainedSteps(StopReason.NONE, torch.zeros((), device=self.ctx.device), None)
        window_start, window_steps = time.perf_counter(), 0
        while self.step < cfg.steps:
            self.stall_report.step_started()
            step_started = time.perf_counter()
            trained.last_loss, step_metrics = self.train_step()
            if trained.first_step_at is None:
                trained.first_step_at = time.time()
            window_steps += 1
            self.step_gc.step_ended(self.step)
            metrics.advance()
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                self.loss_watch.check(self.step)
                window_s = time.perf_counter() - window_start
                metrics.write(self.step, self.logged_metrics(trained.last_loss, step_metrics, window_steps, window_s))
                window_start, window_steps = time.perf_counter(), 0
            self._step_estimate_s = 0.9 * self._step_estimate_s + 0.1 * (time.perf_counter() - step_started)
            if self.evaluates_after(self.step):
                started = time.perf_counter()
                with self.step_gc.paused():  # however many batches it takes
                    metrics.write(self.step, self.evaluate())
                self._eval_estimate_s = time.perf_counter() - started
                window_start += self._eval_estimate_s  # the logged throughput is training's alone
            decision = self.boundary_decision()
            if decision.stop is not StopReason.NONE:
                log.warning("stopping at step %d (%s): saving a checkpoint", self.step, decision.stop.name.lower())
                self.save(wait=True)
                self._barrier()
                trained.stopped = decision.stop
                return trained
            if decision.save and self.step < cfg.steps:
                self.save()
        return trained

    def logged_metrics(self, loss: torch.Tensor, step_metrics: Any, steps: int, seconds: float) -> dict[str, float]:
        """One metrics.jsonl record: the loss and the task's step metrics averaged over ranks (a collective),
        and the throughput and loader wait of the `steps` steps logged since the last record."""
        return {
            **self.step_metrics.average(loss, step_metrics, self.step),
            "samples_per_s": steps * self.cfg.train.global_batch_size / max(seconds, 1e-9),
            "epoch": self.stream.samples_consumed(self.step) / self.stream.num_samples,
            "lr": self.scheduler.get_last_lr()[0],
            # Rank 0's time waiting for batches, as a share of the steps' time.
            "loader_wait": self.batches.take_wait_s() / max(seconds, 1e-9),
            **({"grad_norm": float(self.grad_norm)} if self.grad_norm is not None else {}),
        }
