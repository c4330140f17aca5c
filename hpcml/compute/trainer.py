"""The training loop: each rank trains on its slice of the global batch, gradients are averaged, and
every step boundary is a place where the ranks can agree to save or stop."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import random
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from hpcml import components
from hpcml.compute import checkpoint as ckpt
from hpcml.compute import slurm_job
from hpcml.compute.data import GlobalBatchStream, check_map_style, eval_batches, on_device
from hpcml.compute.dist import DistributedContext, broadcast_from_rank0
from hpcml.compute.gradsync import make_gradient_sync
from hpcml.compute.loader import BatchSource
from hpcml.compute.loss_watch import NonFiniteLossWatch
from hpcml.compute.metrics import MetricsWriter
from hpcml.compute.preempt import BoundaryDecision, StopCoordinator, StopReason
from hpcml.compute.tasks import Task, split_step_output
from hpcml.config import TrainJobConfig
from hpcml.errors import ConfigError, DataError, ReplicasDivergedError
from hpcml.fileio import write_atomically
from hpcml.outputs import MODEL_FILE, RESULT_FILE
from hpcml.signal_names import parse_signal

log = logging.getLogger(__name__)

# Until a save has been timed, the deadline check assumes one takes this long.
INITIAL_SAVE_ESTIMATE_S = 5.0


@dataclass
class TrainingResult:
    steps: int
    final_loss: float
    # What the task's evaluate() returned (classification: test_accuracy, test_loss); {} without data.eval.
    metrics: dict[str, float]
    params_sha256: str
    world_size: int
    num_nodes: int
    backend: str
    grad_sync: str
    launcher: str
    samples_per_s: float
    elapsed_s: float
    output_dir: str
    resumed_from_step: int | None
    # The all-reduce transport per buffer size (bytes -> torch|mpi) when hpcml chose it (auto); else None.
    transport_plan: dict[str, str] | None = None
    # Unix time at which this process finished its first training step (start-up and resume benchmarks).
    first_step_at: float | None = None


@dataclass(frozen=True)
class TrainingOutcome:
    """Either a finished run (result) or one that stopped early, saved, for a reason."""

    result: TrainingResult | None
    stopped: StopReason
    step: int


def parameters_checksum(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter's bytes in order: equal on all ranks iff the replicas are identical."""
    digest = hashlib.sha256()
    for p in model.parameters():
        digest.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def as_tensor(value: Any, device: torch.device) -> torch.Tensor:
    """A step metric (a tensor or a number) as a float32 tensor on `device`, ready to average over ranks."""
    return torch.as_tensor(value).detach().to(device, torch.float32)


def build_model(cfg: TrainJobConfig, device: torch.device) -> torch.nn.Module:
    # Same seed on every rank: identical initial weights even before DDP's broadcast.
    torch.manual_seed(cfg.train.seed)
    model = components.build("model", cfg.model)
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(
            f"model._target_={cfg.model['_target_']} returned a {type(model).__name__}, not an nn.Module."
        )
    return model.to(device)


def build_optimizer(cfg: TrainJobConfig, params) -> torch.optim.Optimizer:
    optimizer = components.build("optim", cfg.optim, params)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(
            f"optim._target_={cfg.optim['_target_']} returned a {type(optimizer).__name__}, not a torch Optimizer."
        )
    return optimizer


def build_scheduler(cfg: TrainJobConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """The config's schedule, stepped once per training step; none: a constant learning rate."""
    if cfg.schedule is None:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return components.build("schedule", cfg.schedule, optimizer)


def build_task(cfg: TrainJobConfig) -> Task:
    task = components.build("task", cfg.task)
    if not isinstance(task, Task):
        raise ConfigError(
            f"task._target_={cfg.task['_target_']} built a {type(task).__name__}, which lacks training_step(model, batch) "
            "or evaluate(model, batches); see hpcml/compute/tasks.py."
        )
    return task


def build_datasets(cfg: TrainJobConfig, device: torch.device) -> tuple[Any, Any | None]:
    """The train and (optional) eval datasets. In-memory ones move to the GPU when they fit, unless
    DataLoader workers read them: a forked worker cannot touch CUDA tensors."""
    in_rank = cfg.loader.num_workers == 0 and cfg.loader.collate_fn is None
    train = components.build("data.train", cfg.data["train"])
    check_map_style(train, "data.train")
    evaluation = None
    if cfg.data.get("eval") is not None:
        evaluation = components.build("data.eval", cfg.data["eval"])
        check_map_style(evaluation, "data.eval")
        evaluation = on_device(evaluation, device)
    return (on_device(train, device) if in_rank else train), evaluation


class Trainer:
    def __init__(self, cfg: TrainJobConfig, ctx: DistributedContext, stop: StopCoordinator | None = None):
        self.cfg = cfg
        self.ctx = ctx
        self.stop = stop
        self.output_dir = Path(broadcast_from_rank0(str(Path(cfg.train.output_dir).resolve()), ctx))
        self.checkpoint_dir = (
            Path(cfg.checkpoint.dir).resolve() if cfg.checkpoint.dir else self.output_dir / "checkpoints"
        )
        # Every random stream seeded alike on every rank before any user code runs: a Dataset or task that
        # draws from numpy or `random` while it is built must not differ between ranks or submissions.
        random.seed(cfg.train.seed)
        np.random.seed(cfg.train.seed)
        torch.manual_seed(cfg.train.seed)
        self.task = build_task(cfg)
        self.train_data, self.eval_data = build_datasets(cfg, ctx.device)
        self.stream = GlobalBatchStream(len(self.train_data), cfg.train.global_batch_size, cfg.train.seed)
        collate = components.build("loader.collate_fn", cfg.loader.collate_fn) if cfg.loader.collate_fn else None
        self.collate = collate
        self.batches = BatchSource(
            self.train_data,
            self.stream,
            ctx.rank,
            ctx.world_size,
            ctx.device,
            cfg.train.seed,
            cfg.loader,
            cfg.train.steps,
            collate,
            stop_signals=(signal.SIGTERM, parse_signal(cfg.preempt.signal)),
        )
        self.model = build_model(cfg, ctx.device)
        self.sync = make_gradient_sync(self.model, ctx, cfg.train)
        self.optimizer = build_optimizer(cfg, self.model.parameters())
        self.scheduler = build_scheduler(cfg, self.optimizer)
        # Everything a checkpoint holds, by name: each has state_dict() and load_state_dict().
        self.stateful: dict[str, Any] = {
            "model": self.model,
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
            "grad_sync": self.sync,
        }
        if hasattr(self.task, "state_dict") and hasattr(self.task, "load_state_dict"):
            self.stateful["task"] = self.task
        self.loss_watch = NonFiniteLossWatch(ctx)
        self._metric_names: list[str] | None = None
        self.writer = (
            ckpt.CheckpointWriter(self.checkpoint_dir, cfg.checkpoint.keep_last, cfg.checkpoint.async_save)
            if ctx.is_main
            else None
        )
        # A forward that updates buffers (BatchNorm statistics) changes checkpointed state.
        self._forward_changes_state = any(True for _ in self.model.buffers())
        self.step = 0
        self.resumed_from: int | None = None
        self._last_save_time = time.monotonic()
        self._save_estimate_s = INITIAL_SAVE_ESTIMATE_S
        self._step_estimate_s = 0.0

    # ------------------------------------------------------------ collectives

    def _barrier(self) -> None:
        if self.ctx.world_size > 1:
            dist.barrier()

    # ------------------------------------------------------------ checkpoints

    def train_state(self) -> dict[str, Any]:
        return {name: obj.state_dict() for name, obj in self.stateful.items()}

    def _choose_checkpoint(self) -> ckpt.LoadedCheckpoint | None:
        """Rank 0 picks, verifies and loads; every rank learns which checkpoint (and loads it too)."""
        mine, choice = None, None
        if self.ctx.is_main:
            mode = self.cfg.checkpoint.resume
            if mode == "auto":
                mine = ckpt.load_latest_verified(self.checkpoint_dir, self.ctx.rank, self.ctx.device)
            elif mode != "none":
                mine = ckpt.verify_and_load(Path(mode), self.ctx.rank, self.ctx.device)
            choice = (str(mine.path), mine.manifest) if mine else None
        choice = broadcast_from_rank0(choice, self.ctx)
        if mine is not None or choice is None:
            return mine
        # Rank 0 verified it; the others only load.
        return ckpt.load_checkpoint(Path(choice[0]), choice[1], self.ctx.rank, self.ctx.device)

    def resume(self) -> None:
        loaded = self._choose_checkpoint()
        if loaded is None:
            return
        path, manifest = loaded.path, loaded.manifest
        batch = self.cfg.train.global_batch_size
        if manifest["global_batch_size"] != batch:
            raise ConfigError(
                f"{path} was written with train.global_batch_size={manifest['global_batch_size']}, this run uses "
                f"{batch}; an exact resume needs the same global batch. Set it back, or checkpoint.resume=none."
            )
        # Checkpoints of earlier versions also hold "scaler": None (an unused mixed-precision slot); never read.
        state = loaded.train_state
        for name, obj in self.stateful.items():
            if name not in state and name != "grad_sync":  # checkpoints before grad_sync state lack it: fine
                raise ConfigError(
                    f"{path} holds no {name!r} state (it holds {', '.join(sorted(state))}): it was written by a run "
                    f"with another {name}. Resume with the same config, or start fresh with checkpoint.resume=none."
                )
            obj.load_state_dict(state.get(name))
        if loaded.rng_state is not None:
            ckpt.restore_rng_state(loaded.rng_state)
        # The data position is a count of global samples, so any world size continues the same stream.
        self.step = loaded.samples_consumed // batch
        self.resumed_from = self.step
        log.info(
            "resumed from %s (step %d, %d samples; written by %d ranks, now %d)",
            path,
            self.step,
            loaded.samples_consumed,
            manifest["world_size"],
            self.ctx.world_size,
        )

    def save(self, wait: bool = False) -> None:
        """Every rank calls this at the same step boundary; rank 0 writes."""
        # A NaN from any rank has reached every replica through the gradient average: never save it.
        self.loss_watch.check(self.step)
        started = time.perf_counter()
        rng_states = [ckpt.capture_rng_state()]
        if self.ctx.world_size > 1:
            rng_states = [None] * self.ctx.world_size
            dist.all_gather_object(rng_states, ckpt.capture_rng_state())
        if self.writer is not None:
            # An async writer copies the live state on its own thread, while the next step's forward and
            # backward run; train_step() waits for that copy before the weights change.
            snap = ckpt.snapshot(
                self.step,
                self.stream.samples_consumed(self.step),
                self.cfg.train.global_batch_size,
                self.ctx.world_size,
                self.train_state(),
                rng_states,
                copy=False,
            )
            self._maybe_inject_save_fault()
            self.writer.submit(snap, stage=self.writer.asynchronous)
            if wait:
                self.writer.wait()
            # The deadline check needs the whole cost of a save: stall plus (for async) the write.
            self._save_estimate_s = max(time.perf_counter() - started, self.writer.last_write_s or 0.0)
        self._save_estimate_s = broadcast_from_rank0(self._save_estimate_s, self.ctx)
        self._last_save_time = time.monotonic()

    def _maybe_inject_save_fault(self) -> None:
        fault = self.cfg.fault
        # Only in the first attempt: the restarted job must get past this step.
        if fault.kill_during_save_at_step == self.step and slurm_job.restart_count(os.environ) == 0:
            # Die with the checkpoint half-written: a partial folder with no manifest.
            partial = self.checkpoint_dir / f".{ckpt.step_dir_name(self.step)}.partial"
            partial.mkdir(parents=True, exist_ok=True)
            (partial / ckpt.STATE_FILE).write_bytes(b"half a checkpoint")
            log.error("fault.kill_during_save_at_step=%d: killing rank 0 in the middle of a save", self.step)
            os.kill(os.getpid(), signal.SIGKILL)

    def periodic_save_due(self) -> bool:
        """Whether checkpoint.every_steps or checkpoint.every_minutes asks for a save at this step."""
        c = self.cfg.checkpoint
        by_steps = c.every_steps > 0 and self.step % c.every_steps == 0
        by_time = c.every_minutes > 0 and time.monotonic() - self._last_save_time >= 60 * c.every_minutes
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
        """One step: the task's loss on this rank's batch, gradients averaged, the optimizer and schedule
        stepped. Returns the loss (detached) and the task's step metrics."""
        batch = self.batch(self.step)
        self.sync.zero_grad(self.optimizer)
        if self._forward_changes_state:
            self._wait_checkpoint_staged()
        loss, step_metrics = self.loss_and_metrics(self.sync.module, batch)
        self.loss_watch.observe(loss, self.step + 1)
        self.sync.backward(loss)
        self.sync.synchronize()
        self._wait_checkpoint_staged()
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        fault = self.cfg.fault
        if fault.raise_at_step == self.step and fault.rank == self.ctx.rank:
            raise RuntimeError(f"injected fault on rank {self.ctx.rank} at step {self.step} (fault.raise_at_step)")
        if fault.hang_at_step == self.step and fault.rank == self.ctx.rank:
            log.error("fault.hang_at_step=%d: this rank stops answering", self.step)
            while True:
                time.sleep(3600)
        if fault.raise_if_file_exists and Path(fault.raise_if_file_exists).exists():
            raise RuntimeError(f"injected fault: {fault.raise_if_file_exists} exists (fault.raise_if_file_exists)")
        if fault.step_sleep_s:
            time.sleep(fault.step_sleep_s)
        return loss.detach(), step_metrics

    def settle(self) -> None:
        """Before the first step of a run or a resume: the gradient sync lays out its buffers and chooses its
        transports on this step's batch, and rank 0 allocates its checkpoint staging buffers.

        The throwaway step leaves no trace: random draws (dropout, a Dataset's augmentation) and the task's
        own state are put back, or a resumed run would differ from the uninterrupted one from here on.
        """
        rng = ckpt.capture_rng_state()
        task_state = copy.deepcopy(self.task.state_dict()) if "task" in self.stateful else None
        batch = self.batch(self.step, peek=True)
        self.sync.settle(lambda module: self.loss_and_metrics(module, batch)[0])
        ckpt.restore_rng_state(rng)
        if task_state is not None:
            self.task.load_state_dict(task_state)
        if self.writer is not None:
            self.writer.prepare(self.train_state())

    def _wait_checkpoint_staged(self) -> None:
        if self.writer is not None:
            self.writer.wait_staged()

    def boundary_decision(self) -> BoundaryDecision:
        """Whether to stop or save after this step, the same on every rank (a collective: every rank calls it)."""
        save_due = self.periodic_save_due()
        if self.stop is None:
            return BoundaryDecision(StopReason.NONE, save_due)
        return self.stop.agree(self._save_estimate_s, self._step_estimate_s, save_due)

    def averaged_step_metrics(self, loss: torch.Tensor, step_metrics: Any) -> dict[str, float]:
        """The loss and the task's step metrics, averaged over ranks in one all-reduce. Their names must be the
        same on every rank, or the ranks would average different things (or wait on each other for ever):
        compared across ranks the first time, and against the first time's on each rank after that (a rank
        that raises alone ends the whole job)."""
        names = sorted(step_metrics)
        task = type(self.task).__name__
        if self._metric_names is None:
            everyone = [names]
            if self.ctx.world_size > 1:
                everyone = [None] * self.ctx.world_size
                dist.all_gather_object(everyone, names)
            if any(other != everyone[0] for other in everyone):
                raise ConfigError(
                    f"{task}.training_step returned different metric names on different ranks "
                    f"({', '.join(f'rank {r}: {n}' for r, n in enumerate(everyone))}); return the same names on "
                    "every rank (a per-rank value under one name is averaged)."
                )
            self._metric_names = everyone[0]
        if names != self._metric_names:
            raise ConfigError(
                f"{task}.training_step returned metrics {names} at step {self.step} on rank {self.ctx.rank}, but "
                f"{self._metric_names} at the first logged step; return the same names at every step."
            )
        values = [loss.detach().to(torch.float32).reshape(())]
        for name in names:
            value = as_tensor(step_metrics[name], loss.device)
            if value.numel() != 1:
                raise TypeError(f"{task}.training_step: metric {name!r} has {value.numel()} values; give one number.")
            values.append(value.reshape(()))
        values = torch.stack(values)
        if self.ctx.world_size > 1:
            dist.all_reduce(values)
            values /= self.ctx.world_size
        return dict(zip(["loss", *names], values.tolist(), strict=True))

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
        self.model.eval()
        try:
            batches = eval_batches(self.eval_data, self.cfg.train.eval_batch_size, self.ctx.device, self.collate)
            found = self.task.evaluate(self.model, batches)
        finally:
            self.model.train()
        try:
            # Numbers of any kind: floats, numpy scalars, one-element tensors.
            return {str(k): float(v) for k, v in found.items()}
        except (AttributeError, TypeError, ValueError, RuntimeError):
            raise TypeError(
                f"{type(self.task).__name__}.evaluate must return a dict of numbers; got {found!r}."
            ) from None

    def fit(self) -> TrainingOutcome:
        cfg = self.cfg.train
        self.resume()
        first_step = self.step
        if self.step < cfg.steps:
            self.settle()
        metrics = MetricsWriter(self.output_dir, self.ctx.is_main, cfg.steps, self.step)
        start = window_start = time.perf_counter()
        window_steps = 0
        first_step_at = None
        loss = torch.zeros((), device=self.ctx.device)
        try:
            while self.step < cfg.steps:
                step_started = time.perf_counter()
                loss, step_metrics = self.train_step()
                if first_step_at is None:
                    first_step_at = time.time()
                window_steps += 1
                metrics.advance()
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    self.loss_watch.check(self.step)
                    elapsed = time.perf_counter() - window_start
                    metrics.write(
                        self.step,
                        {
                            **self.averaged_step_metrics(loss, step_metrics),
                            "samples_per_s": window_steps * cfg.global_batch_size / max(elapsed, 1e-9),
                            "epoch": self.stream.samples_consumed(self.step) / self.stream.num_samples,
                            "lr": self.scheduler.get_last_lr()[0],
                            # Rank 0's time waiting for batches, as a share of the steps' time.
                            "loader_wait": self.batches.take_wait_s() / max(elapsed, 1e-9),
                        },
                    )
                    window_start, window_steps = time.perf_counter(), 0
                self._step_estimate_s = 0.9 * self._step_estimate_s + 0.1 * (time.perf_counter() - step_started)
                decision = self.boundary_decision()
                if decision.stop is not StopReason.NONE:
                    log.warning("stopping at step %d (%s): saving a checkpoint", self.step, decision.stop.name.lower())
                    self.save(wait=True)
                    self._barrier()
                    return TrainingOutcome(None, decision.stop, self.step)
                if decision.save and self.step < cfg.steps:
                    self.save()
            elapsed = time.perf_counter() - start
            if self.resumed_from != self.step:
                # The final state, saved before evaluating: a finished run that is requeued does not retrain,
                # and an evaluate() that fails loses nothing (a rerun resumes at the end and evaluates again).
                self.save(wait=True)
            evaluated = self.evaluate()
            if evaluated:
                metrics.write(self.step, evaluated)
        finally:
            metrics.close()
            self.batches.close()
        result = TrainingResult(
            steps=self.step,
            final_loss=self.global_mean(loss),
            metrics=evaluated,
            params_sha256=parameters_checksum(self.model),
            world_size=self.ctx.world_size,
            num_nodes=self.ctx.placement.num_nodes,
            backend=self.ctx.backend,
            grad_sync=cfg.grad_sync,
            launcher=self.ctx.launcher,
            samples_per_s=(self.step - first_step) * cfg.global_batch_size / max(elapsed, 1e-9),
            elapsed_s=elapsed,
            output_dir=str(self.output_dir),
            resumed_from_step=self.resumed_from,
            transport_plan=self.sync.state_dict().get("transport_plan"),
            first_step_at=first_step_at,
        )
        self._write_result(result)
        return TrainingOutcome(result, StopReason.NONE, self.step)

    def _write_result(self, result: TrainingResult) -> None:
        """Every rank's checksum goes into result.json, so a diverged replica cannot hide."""
        checksums = [result.params_sha256]
        if self.ctx.world_size > 1:
            checksums = [None] * self.ctx.world_size
            dist.all_gather_object(checksums, result.params_sha256)
        identical = len(set(checksums)) == 1
        if self.ctx.is_main:
            write_atomically(self.output_dir / MODEL_FILE, lambda f: torch.save(self.model.state_dict(), f))
            record = {**asdict(result), "rank_params_sha256": checksums, "replicas_identical": identical}
            write_atomically(
                self.output_dir / RESULT_FILE, lambda f: f.write((json.dumps(record, indent=2) + "\n").encode())
            )
        if not identical:
            # Every rank knows; the result stays on disk for inspection, but the run must not look finished.
            raise ReplicasDivergedError(
                f"replicas diverged: parameter checksums differ across ranks ({', '.join(c[:12] for c in checksums)}); "
                f"see {self.output_dir / RESULT_FILE}. Something made the ranks apply different updates: a rank-"
                "dependent config, data or optimizer state, or a nondeterministic gradient reduction."
            )
