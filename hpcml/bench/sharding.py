"""FSDP against DDP on the same transformer LM and ranks: training-state memory per rank, tokens/s, and the
sharded save (every rank writes its shard) against rank 0 writing the whole state, and against the disk.

Memory is counted, not sampled: the bytes of the parameters, gradients and optimizer state each rank holds
after a step (a sharded tensor's local shard), which is what sharding divides; a process's peak RSS on this
shared machine would bury that in the allocator's and the interpreter's own. Rounds alternate the two.
"""

from __future__ import annotations

import os
import shutil
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from hpcml.bench import training
from hpcml.bench.checkpoints import disk_write
from hpcml.bench.record import BenchResult, Figure
from hpcml.compute.preempt import PreemptionGuard
from hpcml.compute.runtime import stop_coordinator
from hpcml.compute.trainer import Trainer
from hpcml.compute.transport import iterations_for, mean_time
from hpcml.config import CheckpointConfig, LoaderConfig, TrainConfig, TrainJobConfig

MEMORY_TARGET = 0.35  # FSDP's training state per rank at most 0.35x DDP's (4 ranks; ideal 0.25)
DISK_TARGET = 0.8  # a sharded save writes at 0.8 of the disk's own speed or better
ENDLESS = 10**9
RANKS = 4


@dataclass(frozen=True)
class Variant:
    name: str
    block_size: int
    d_model: int
    n_layer: int
    per_rank_batch: int


def make_trainer(v: Variant, ctx, workdir: Path, grad_sync: str) -> Trainer:
    cfg = TrainJobConfig(
        model={"_target_": "hpcml.workloads.gpt.TinyGPT", "block_size": v.block_size, "d_model": v.d_model,
               "n_layer": v.n_layer, "n_head": 4},
        data={"train": {"_target_": "hpcml.workloads.text.PythonSourceBytes", "block_size": v.block_size,
                        "max_bytes": 1_000_000}, "eval": None},
        task={"_target_": "hpcml.workloads.language_model.LanguageModeling"},
        optim={"_target_": "torch.optim.AdamW", "lr": 0.001, "weight_decay": 0.1},
        loader=LoaderConfig(num_workers=0),
        train=TrainConfig(steps=ENDLESS, global_batch_size=v.per_rank_batch * ctx.world_size, grad_sync=grad_sync,
                          transport="torch", output_dir=str(workdir / grad_sync)),
        checkpoint=CheckpointConfig(keep_last=1),
    )  # fmt: skip
    trainer = Trainer(cfg, ctx, stop_coordinator(cfg, ctx, PreemptionGuard([])))
    trainer.settle()
    return trainer


def _local_bytes(tensor: torch.Tensor) -> int:
    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return local.numel() * local.element_size()


def training_state_bytes(trainer: Trainer) -> dict[str, int]:
    """This rank's parameters, gradients and optimizer state, in bytes (sharded tensors: the local shard). DDP's
    gradients are counted as their `.grad` tensors, which are views into its buckets here
    (train.gradient_as_bucket_view, the default): the buckets hold no more."""
    params = list(trainer.model.parameters())
    grads = sum(_local_bytes(p.grad) for p in params if p.grad is not None)
    optimizer = sum(
        _local_bytes(v) for state in trainer.optimizer.state.values() for v in state.values() if torch.is_tensor(v)
    )
    return {"parameters": sum(_local_bytes(p) for p in params), "gradients": grads, "optimizer": optimizer}


def timed_save(trainer: Trainer) -> float:
    """One synchronous save of the trainer's state, as a stop makes it; every rank waits for the commit."""
    os.sync()  # earlier writes are not flushed on this save's time
    dist.barrier()
    started = time.perf_counter()
    trainer.save(wait=True)
    dist.barrier()
    return time.perf_counter() - started


def checkpoint_bytes(directory: Path) -> int:
    newest = max(directory.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    return sum(f.stat().st_size for f in newest.rglob("*") if f.is_file())


def measure(v: Variant, ctx, budget_s: float, rounds: int, workdir: Path) -> dict:
    trainers = {sync: make_trainer(v, ctx, workdir, sync) for sync in ("fsdp", "ddp")}
    steps = {sync: training.loop_step(t) for sync, t in trainers.items()}
    for step in steps.values():
        step()  # the optimizer state exists after the first step
    memory = {sync: training_state_bytes(t) for sync, t in trainers.items()}
    iters = iterations_for(steps["fsdp"], budget_s)
    rounds_s: dict[str, list[float]] = {sync: [] for sync in trainers}
    saves_s: dict[str, list[float]] = {sync: [] for sync in trainers}
    disk_s: list[float] = []
    size = 0
    for _ in range(rounds):
        for sync, step in steps.items():
            rounds_s[sync].append(mean_time(step, iters, warmup=1))
            saves_s[sync].append(timed_save(trainers[sync]))
        if ctx.is_main:  # the disk's own speed for as many bytes as the sharded checkpoint holds
            size = checkpoint_bytes(trainers["fsdp"].checkpoint_dir)
            disk_s.append(disk_write(workdir / "disk-baseline.bin", np.ones(size, dtype=np.uint8)))
    dist.barrier()  # every rank's last save is done before rank 0 clears the folders
    if ctx.is_main:
        (workdir / "disk-baseline.bin").unlink(missing_ok=True)
        for t in trainers.values():
            shutil.rmtree(t.checkpoint_dir, ignore_errors=True)
    return {
        **asdict(v),
        "ranks": ctx.world_size,
        "memory_bytes": memory,
        "rounds_s": rounds_s,
        "saves_s": saves_s,
        "disk_write_s": disk_s,
        "sharded_checkpoint_bytes": size,
        "step_s": {sync: statistics.median(s) for sync, s in rounds_s.items()},
    }


def measure_all(variants: list[Variant], ctx, budget_s: float, rounds: int, workdir: Path) -> list[dict]:
    return [measure(v, ctx, budget_s, rounds, workdir) for v in variants]


def figures_for(rows: list[dict]) -> list[Figure]:
    figures = []
    for r in rows:
        memory = {sync: sum(parts.values()) for sync, parts in r["memory_bytes"].items()}
        figures.append(
            Figure.from_rounds("sharding", f"{r['name']}: parameters + gradients + optimizer state per rank, "
                               f"{r['ranks']} ranks", "MB", [memory["fsdp"] / 1e6], "DDP, same model",
                               [memory["ddp"] / 1e6], higher_is_better=False, target=1 / MEMORY_TARGET)
        )  # fmt: skip
        tokens = r["per_rank_batch"] * r["ranks"] * r["block_size"]
        figures.append(
            Figure.from_rounds("sharding", f"{r['name']}: FSDP tokens/s", "tokens/s",
                               [tokens / s for s in r["rounds_s"]["fsdp"]], "DDP, same model and ranks",
                               [tokens / s for s in r["rounds_s"]["ddp"]], higher_is_better=True)
        )  # fmt: skip
        figures.append(
            Figure.from_rounds("sharding", f"{r['name']}: sharded save ({r['ranks']} ranks write their shards)",
                               "s", r["saves_s"]["fsdp"], "rank 0 writes the whole state (DDP)", r["saves_s"]["ddp"],
                               higher_is_better=False)
        )  # fmt: skip
        if r["disk_write_s"]:
            figures.append(
                Figure.from_rounds("sharding", f"{r['name']}: sharded save against the disk, same bytes", "s",
                                   r["saves_s"]["fsdp"], "one write + fsync of as many bytes", r["disk_write_s"],
                                   higher_is_better=False, target=DISK_TARGET)
            )  # fmt: skip
    return figures


VARIANTS = [Variant("byte LM, 4 layers x 256 wide", block_size=64, d_model=256, n_layer=4, per_rank_batch=8)]
QUICK_VARIANTS = [Variant("byte LM, 2 layers x 128 wide", block_size=32, d_model=128, n_layer=2, per_rank_batch=4)]


def run(quick: bool, workdir: Path) -> BenchResult:
    budget_s, rounds = (0.2, 1) if quick else (1.0, 3)
    result = BenchResult("sharding", quick, {"budget_s": budget_s, "rounds": rounds, "cpu_cores": os.cpu_count()})
    variants = QUICK_VARIANTS if quick else VARIANTS
    result.measurements.extend(training.measure_on_ranks(__name__, RANKS, variants, budget_s, rounds, workdir))
    result.figures = figures_for(result.measurements)
    result.notes.append(
        "Memory counts each rank's parameter, gradient and optimizer-state bytes after a step (sharded tensors: "
        "the local shard). FSDP keeps what no unit holds (here the embeddings, final norm and head) in the root "
        "unit, sharded too; the unsharded, gathered parameters of the unit running are transient and not counted."
    )
    if (os.cpu_count() or 1) < RANKS:
        result.notes.append(
            f"{RANKS} ranks on {os.cpu_count()} cores: tokens/s and save times compare FSDP and DDP on the same "
            "oversubscribed cores, not what either reaches on its own hardware."
        )
    return result


if __name__ == "__main__":
    training.variants_worker(Variant, measure_all, __doc__.splitlines()[0])
