"""A rank's peak host memory, FSDP against DDP on CPUs, with freed blocks returned to the OS at once or kept in
glibc's heap (train.freed_host_memory), and what returning them costs a step.

Each run is a job of its own (the allocator's setting holds for a whole process, and so does a peak), on the
sharding benchmark's big LM at 4 ranks; rounds alternate the runs. A rank's peak is counted from its
resident memory just before the model is built: the interpreter's and torch's own come first, the same for
every run.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass
from pathlib import Path

import torch

from hpcml.bench import sharding, training
from hpcml.bench.record import BenchResult, Figure
from hpcml.compute import host_memory
from hpcml.compute.step_gc import StepAlignedGC
from hpcml.compute.transport import mean_time
from hpcml.config import TrainConfig

RANKS = 4
WARMUP_STEPS = 2  # FSDP's and the allocator's first steps lay out what later ones reuse


@dataclass(frozen=True)
class Run:
    name: str
    grad_sync: str
    freed_host_memory: str
    quick: bool

    @property
    def model(self) -> sharding.Variant:
        return sharding.QUICK_SAVE_VARIANTS[0] if self.quick else sharding.SAVE_VARIANTS[0]

    @property
    def steps(self) -> int:  # timed, after the warm-up
        return 2 if self.quick else 4


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_resident_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux counts it in KiB


def measure_all(runs: list[Run], ctx, budget_s: float, rounds: int, workdir: Path) -> list[dict]:
    (run,) = runs  # one per process: the allocator's setting and the peak are the process's
    before = resident_bytes()
    said = host_memory.apply(run.freed_host_memory, run.grad_sync, ctx.device, environ={})
    with StepAlignedGC(TrainConfig.gc_every_steps):
        trainer = sharding.make_trainer(run.model, ctx, workdir, run.grad_sync)
        step = training.loop_step(trainer)
        step_s = mean_time(step, iters=run.steps, warmup=WARMUP_STEPS)
        trainer.checkpoints.close()
    grown = torch.tensor([float(peak_resident_bytes() - before)])
    torch.distributed.all_reduce(grown, op=torch.distributed.ReduceOp.MAX)  # the rank nearest running out
    return [{"run": run.name, "policy": said, "ranks": ctx.world_size, "peak_growth_bytes": float(grown),
             "step_s": step_s}]  # fmt: skip


def runs_for(quick: bool) -> list[Run]:
    return [
        Run("fsdp, returned", "fsdp", host_memory.RETURN, quick),  # auto's choice for fsdp on CPUs
        Run("fsdp, kept", "fsdp", host_memory.KEEP, quick),
        Run("ddp, kept", "ddp", host_memory.KEEP, quick),  # auto's choice for ddp
    ]


def figures_for(rows: list[dict], model: sharding.Variant) -> list[Figure]:
    by_run: dict[str, list[dict]] = {}
    for row in rows:
        by_run.setdefault(row["run"], []).append(row)

    def rounds(run: str, key: str, scale: float = 1.0) -> list[float]:
        return [r[key] * scale for r in by_run[run]]

    where = f"{model.name}, {RANKS} ranks"
    return [
        Figure.from_rounds("host_memory", f"{where}: FSDP peak host memory per rank, freed memory returned (auto)",
                           "MB", rounds("fsdp, returned", "peak_growth_bytes", 1e-6), "DDP, freed memory kept (auto)",
                           rounds("ddp, kept", "peak_growth_bytes", 1e-6), higher_is_better=False),
        Figure.from_rounds("host_memory", f"{where}: FSDP peak host memory per rank, freed memory returned", "MB",
                           rounds("fsdp, returned", "peak_growth_bytes", 1e-6), "kept (glibc's default)",
                           rounds("fsdp, kept", "peak_growth_bytes", 1e-6), higher_is_better=False),
        Figure.from_rounds("host_memory", f"{where}: FSDP step, freed memory returned", "s",
                           rounds("fsdp, returned", "step_s"), "kept (glibc's default)", rounds("fsdp, kept", "step_s"),
                           higher_is_better=False),
    ]  # fmt: skip


def run(quick: bool, workdir: Path) -> BenchResult:
    rounds = 1 if quick else 2
    runs = runs_for(quick)
    result = BenchResult("host_memory", quick, {"rounds": rounds, "cpu_cores": os.cpu_count()})
    for _ in range(rounds):
        for r in runs:
            result.measurements.extend(training.measure_on_ranks(__name__, RANKS, [r], 0.0, 1, workdir))
    result.figures = figures_for(result.measurements, runs[0].model)
    result.notes.append(
        "Peak host memory is each rank's peak resident memory less what it held just before the model was built "
        "(the rank with the most). Every run is a process of its own; rounds alternate them."
    )
    if (os.cpu_count() or 1) < RANKS:
        result.notes.append(f"{RANKS} ranks on {os.cpu_count()} cores: step times are on oversubscribed cores.")
    return result


if __name__ == "__main__":
    training.variants_worker(Run, measure_all, __doc__.splitlines()[0])
