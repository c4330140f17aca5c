"""A rank's peak host memory, FSDP against DDP on CPUs, with freed blocks returned to the OS at once or kept in
glibc's heap (train.freed_host_memory), and what returning them costs a step.

Each run is a job of its own (the allocator's setting holds for a whole process, and so does a peak), on the
sharding benchmark's big LM at 4 ranks; rounds alternate the runs. A rank's peak is counted from its
resident memory just before the model is built, with the kernel's peak reset there: the interpreter's and
torch's own come first, the same for every run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from hpcml.bench import sharding, training
from hpcml.bench.record import BenchResult, Figure
from hpcml.compute import host_memory
from hpcml.compute.step_gc import StepAlignedGC
from hpcml.compute.transport import mean_time
from hpcml.config import TrainConfig

RANKS = sharding.RANKS  # the global batch make_trainer sizes is for this many
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


def memory_status(field: str) -> int:
    """/proc/self/status's `field` (VmRSS, VmHWM: resident now, its peak), in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024  # in kB there
    raise RuntimeError(f"/proc/self/status has no {field}: this benchmark needs Linux")


def reset_peak_resident() -> None:
    """VmHWM from here on (Linux 4.0+): what the process held at its peak before, importing, is not counted."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def measure_all(runs: list[Run], ctx, budget_s: float, rounds: int, workdir: Path) -> list[dict]:
    (this,) = runs  # one per process: the allocator's setting and the peak are the process's
    allocator = host_memory.apply(this.freed_host_memory, this.grad_sync, ctx.device)
    reset_peak_resident()
    before = memory_status("VmRSS")
    with StepAlignedGC(TrainConfig.gc_every_steps):
        trainer = sharding.make_trainer(this.model, ctx, workdir, this.grad_sync)
        step = training.loop_step(trainer)
        step_s = mean_time(step, iters=this.steps, warmup=WARMUP_STEPS)
        trainer.checkpoints.close()
    grown = torch.tensor([float(memory_status("VmHWM") - before)])
    torch.distributed.all_reduce(grown, op=torch.distributed.ReduceOp.MAX)  # the rank nearest running out
    return [{"run": this.name, "policy": allocator, "ranks": ctx.world_size, "peak_growth_bytes": float(grown),
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
        for one in runs:
            result.measurements.extend(training.measure_on_ranks(__name__, RANKS, [one], 0.0, 1, workdir))
    result.figures = figures_for(result.measurements, runs[0].model)
    result.notes.append(
        "Peak host memory is each rank's peak resident memory (VmHWM, reset just before the model was built) less "
        "what it held then, for the rank with the most. Every run is a process of its own; rounds alternate them."
    )
    if (os.cpu_count() or 1) < RANKS:
        result.notes.append(f"{RANKS} ranks on {os.cpu_count()} cores: step times are on oversubscribed cores.")
    return result


if __name__ == "__main__":
    training.variants_worker(Run, measure_all, __doc__.splitlines()[0])
