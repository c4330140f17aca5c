"""Training metrics for people and programs: JSONL lines, TensorBoard scalars, a progress bar; and the
per-step metrics averaged over ranks that they show.

Only rank 0 writes; other ranks get a writer that does nothing, so call sites need no rank checks.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from hpcml.errors import ConfigError
from hpcml.outputs import METRICS_FILE

log = logging.getLogger(__name__)


class MetricsWriter:
    def __init__(self, output_dir: Path, enabled: bool, total_steps: int, first_step: int = 0):
        self.enabled = enabled
        self._jsonl = None
        self._tensorboard = None
        self._progress = None
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        # Append: a resumed run continues the same file.
        self._jsonl = open(output_dir / METRICS_FILE, "a", buffering=1)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(log_dir=str(output_dir / "tensorboard"))
        except ImportError:  # tensorboard is a dependency; a broken install must not stop training
            log.warning("tensorboard is not importable; writing JSONL metrics only")
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._progress = tqdm(total=total_steps, initial=first_step, unit="step", dynamic_ncols=True)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **metrics}
        self._jsonl.write(json.dumps(record) + "\n")
        if self._tensorboard is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self._tensorboard.add_scalar(key, value, step)
        if self._progress is not None:
            self._progress.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if isinstance(v, float)})
        else:
            log.info("step %d %s", step, " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float)))

    def advance(self, steps: int = 1) -> None:
        if self._progress is not None:
            self._progress.update(steps)

    def close(self) -> None:
        for closable in (self._progress, self._tensorboard, self._jsonl):
            if closable is not None:
                closable.close()


class StepMetricsAverager:
    """The loss and a task's step metrics, averaged over ranks in one all-reduce.

    Their names must be the same on every rank, or the ranks would average different things (or wait on each
    other for ever): compared across ranks the first time, and against the first time's on each rank after
    that (a rank that raises alone ends the whole job)."""

    def __init__(self, ctx: Any, task_name: str):
        self.ctx, self.task_name = ctx, task_name
        self._names: list[str] | None = None

    def average(self, loss: Any, step_metrics: dict[str, Any], step: int) -> dict[str, float]:
        names, ctx, task = sorted(step_metrics), self.ctx, self.task_name
        if self._names is None:
            everyone = [names]
            if ctx.world_size > 1:
                everyone = [None] * ctx.world_size
                dist.all_gather_object(everyone, names)
            if any(other != everyone[0] for other in everyone):
                raise ConfigError(
                    f"{task}.training_step returned different metric names on different ranks "
                    f"({', '.join(f'rank {r}: {n}' for r, n in enumerate(everyone))}); return the same names on "
                    "every rank (a per-rank value under one name is averaged)."
                )
            self._names = everyone[0]
        if names != self._names:
            raise ConfigError(
                f"{task}.training_step returned metrics {names} at step {step} on rank {ctx.rank}, but "
                f"{self._names} at the first logged step; return the same names at every step."
            )
        values = [loss.detach().to(torch.float32).reshape(())]
        for name in names:
            value = torch.as_tensor(step_metrics[name]).detach().to(loss.device, torch.float32)
            if value.numel() != 1:
                raise TypeError(f"{task}.training_step: metric {name!r} has {value.numel()} values; give one number.")
            values.append(value.reshape(()))
        values = torch.stack(values)
        if ctx.world_size > 1:
            dist.all_reduce(values)
            values /= ctx.world_size
        return dict(zip(["loss", *names], values.tolist(), strict=True))


def mean_over_micro_batches(metrics: list[dict[str, Any]], task_name: str) -> dict[str, torch.Tensor]:
    """A step's metrics from each of its micro-batches (gradient accumulation), averaged: the same names
    from every micro-batch, or the step would log one micro-batch's value as the step's."""
    names = set(metrics[0])
    if any(set(m) != names for m in metrics):
        raise ConfigError(
            f"{task_name}.training_step returned different metric names for the micro-batches of one step "
            f"({', '.join(str(sorted(m)) for m in metrics)}); return the same names for every batch."
        )
    return {
        name: torch.stack([torch.as_tensor(m[name]).detach().to(torch.float32) for m in metrics]).mean()
        for name in names
    }
