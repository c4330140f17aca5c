"""FSDP against DDP on the same transformer LM and ranks: training-state memory per rank, tokens/s, and the
sharded save (every rank writes its shard) against rank 0 writing the whole state, and against the disk;
how long an asynchronous sharded save blocks training against a synchronous one; and, at 2 ranks, a resume
from the checkpoint the 4 ranks wrote (resharded while loading) against a resume from one of the same
shapes and size written at 2, and the saves of the big state again (on a 2-core machine, a rank per core).

Memory is counted, not sampled: the bytes of the parameters, gradients and optimizer state each rank holds
after a step (a sharded tensor's local shard), which is what sharding divides; a process's peak RSS on this
shared machine would bury that in the allocator's and the interpreter's own. Rounds alternate the two.
"""

from __future__ import annotations

import gc
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
from hpcml.compute.checkpoint import list_checkpoints
from hpcml.compute.preempt import PreemptionGuard
from hpcml.compute.runtime import stop_coordinator
from hpcml.compute.step_gc import StepAlignedGC
from hpcml.compute.trainer import Trainer
from hpcml.compute.transport import iterations_for, mean_time
from hpcml.config import CheckpointConfig, LoaderConfig, TrainConfig, TrainJobConfig

MEMORY_TARGET = 0.35  # FSDP's training state per rank at most 0.35x DDP's (4 ranks; ideal 0.25)
DISK_TARGET = 0.8  # a sharded save writes at 0.8 of the disk's own speed or better
ASYNC_STALL_TARGET = 0.1  # an asynchronous sharded save blocks training for at most 0.1x a synchronous save
# A stall is the slowest rank's, on ranks that share cores here: one save's can be twice the next's, so each
# round reports the median of several.
STALLS_PER_ROUND = 5
ENDLESS = 10**9
RANKS = 4
RESHARD_RANKS = 2  # the resharding resume: the checkpoint the RANKS ranks wrote, loaded at this many
# Where the RANKS-rank run leaves its last FSDP checkpoint for that resume: in the benchmark's working folder,
# which both runs share (each worker's own folder is removed when it ends).
SAVED_AT_RANKS = "sharding-saved-at-ranks"


@dataclass(frozen=True)
class Variant:
    name: str
    block_size: int
    d_model: int
    n_layer: int
    per_rank_batch: int
    # Timed for its saves alone (after one step, so that the optimizer state exists): a state big enough that
    # the disk sets a save's pace, not DCP's and the commit's work per tensor and per file.
    saves_only: bool = False


def make_trainer(v: Variant, ctx, workdir: Path, grad_sync: str, async_save: bool = False) -> Trainer:
    cfg = TrainJobConfig(
        model={"_target_": "hpcml.workloads.gpt.TinyGPT", "block_size": v.block_size, "d_model": v.d_model,
               "n_layer": v.n_layer, "n_head": 4},
        data={"train": {"_target_": "hpcml.workloads.text.PythonSourceBytes", "block_size": v.block_size,
                        "max_bytes": 1_000_000}, "eval": None},
        task={"_target_": "hpcml.workloads.language_model.LanguageModeling"},
        optim={"_target_": "torch.optim.AdamW", "lr": 0.001, "weight_decay": 0.1},
        loader=LoaderConfig(num_workers=0),
        # One global batch at any rank count: a resume at RESHARD_RANKS continues the RANKS-rank run's stream.
        train=TrainConfig(steps=ENDLESS, global_batch_size=v.per_rank_batch * RANKS, grad_sync=grad_sync,
                          transport="torch", output_dir=str(workdir / f"{grad_sync}-async{int(async_save)}")),
        checkpoint=CheckpointConfig(keep_last=1, async_save=async_save),
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


def settled(trainers: list[Trainer]) -> None:
    """Off the clock of the save to come: every trainer's deletion of the checkpoints its last save made old,
    the flush of every earlier write, and a young garbage collection (what fit runs at step boundaries). In
    training, a deletion runs in the background while the steps up to the next save go on (BackgroundPruner);
    saves timed back to back would each pay the one before, or another trainer's: 0.06-0.08 s of a 0.47 s save
    of 345 MB at 2 ranks (measured). The deletions are kept rather than skipped: on this VM's disk, a write to
    blocks never written before ran up to 3x slower than one to freed blocks (0.9-1.2 s against 0.31-0.34 s
    for rank 0's 345 MB, measured), and the disk's own figure reuses its file's blocks."""
    for trainer in trainers:
        trainer.checkpoints.close()  # the save in flight, if any, and the deletion after it; the writers go on
    gc.collect(1)
    os.sync()
    dist.barrier()


def timed_save(trainer: Trainer) -> float:
    """One synchronous save of the trainer's state, as a stop makes it; every rank waits for the commit (the
    caller has settled the disk)."""
    started = time.perf_counter()
    trainer.save(wait=True)
    dist.barrier()
    return time.perf_counter() - started


def timed_async_stall(trainer: Trainer) -> float:
    """How long an asynchronous save holds the training thread (every rank's, the slowest's; the caller has
    settled the disk); the write that goes on in the background is waited for afterwards, outside the figure."""
    started = time.perf_counter()
    trainer.save(wait=False)
    blocked = time.perf_counter() - started
    trainer.checkpoints.sharded_writer.wait()
    slowest = torch.tensor([blocked])
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return float(slowest)


def checkpoint_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in list_checkpoints(directory)[0].rglob("*") if f.is_file())


def disk_for_newest_checkpoint(directory: Path, workdir: Path) -> tuple[int, float]:
    """The newest checkpoint's size in `directory`, and the disk's time to write and fsync as many bytes."""
    size = checkpoint_bytes(directory)
    return size, disk_write(workdir / "disk-baseline.bin", np.ones(size, dtype=np.uint8))


def measure(v: Variant, ctx, budget_s: float, rounds: int, workdir: Path, kept: Path) -> dict:
    trainers = {sync: make_trainer(v, ctx, workdir, sync) for sync in ("fsdp", "ddp")}
    asynchronous = make_trainer(v, ctx, workdir, "fsdp", async_save=True)
    training.loop_step(asynchronous)()
    steps = {sync: training.loop_step(t) for sync, t in trainers.items()}
    for step in steps.values():
        step()  # the optimizer state exists after the first step
    memory = {sync: training_state_bytes(t) for sync, t in trainers.items()}
    iters = iterations_for(steps["fsdp"], budget_s)
    rounds_s: dict[str, list[float]] = {sync: [] for sync in trainers}
    saves_s: dict[str, list[float]] = {sync: [] for sync in trainers}
    disk_s: list[float] = []
    stalls_s: list[float] = []  # each round's median
    all_stalls_s: list[list[float]] = []
    size = 0
    # An attempt's first asynchronous save also allocates the CPU buffers every later one refills: timed apart.
    everyone = [*trainers.values(), asynchronous]
    settled(everyone)
    first_stall_s = timed_async_stall(asynchronous)
    for _ in range(rounds):
        for sync, step in steps.items():
            rounds_s[sync].append(mean_time(step, iters, warmup=1))
            settled(everyone)
            saves_s[sync].append(timed_save(trainers[sync]))
        round_stalls = []
        for _ in range(STALLS_PER_ROUND):
            settled(everyone)
            round_stalls.append(timed_async_stall(asynchronous))
        stalls_s.append(statistics.median(round_stalls))
        all_stalls_s.append(round_stalls)
        if ctx.is_main:  # the disk's own speed for as many bytes as the sharded checkpoint holds
            size, disk = disk_for_newest_checkpoint(trainers["fsdp"].checkpoint_dir, workdir)
            disk_s.append(disk)
    for t in [*trainers.values(), asynchronous]:
        t.checkpoints.close()  # the last prune too
    dist.barrier()  # every rank's last save is done before rank 0 clears the folders
    if ctx.is_main:
        (workdir / "disk-baseline.bin").unlink(missing_ok=True)
        shutil.rmtree(kept, ignore_errors=True)
        newest = list_checkpoints(trainers["fsdp"].checkpoint_dir)[0]
        shutil.copytree(newest, kept / newest.name)  # for the resharding resume (measure_reshard)
        for t in [*trainers.values(), asynchronous]:
            shutil.rmtree(t.checkpoint_dir, ignore_errors=True)
    return {
        **asdict(v),
        "ranks": ctx.world_size,
        "memory_bytes": memory,
        "rounds_s": rounds_s,
        "saves_s": saves_s,
        "disk_write_s": disk_s,
        "async_stall_s": stalls_s,
        "async_stalls_s_each": all_stalls_s,
        "async_first_stall_s": first_stall_s,
        "sharded_checkpoint_bytes": size,
        "step_s": {sync: statistics.median(s) for sync, s in rounds_s.items()},
    }


def measure_saves(v: Variant, ctx, rounds: int, workdir: Path) -> dict:
    """Synchronous saves of one state, sharded (every rank its shard) and whole (rank 0, DDP), against the
    disk writing as many bytes; the three alternate."""
    trainers = {sync: make_trainer(v, ctx, workdir / "saves", sync) for sync in ("fsdp", "ddp")}
    for trainer in trainers.values():
        training.loop_step(trainer)()  # the optimizer state exists after the first step
    saves_s: dict[str, list[float]] = {sync: [] for sync in trainers}
    disk_s: list[float] = []
    size = 0
    for _ in range(rounds):
        for sync, trainer in trainers.items():
            # Each save of a step of its own, as in training (the same state: no step is trained between). A save
            # of a step already saved replaces its folder inside the commit, which only a resumed run does.
            trainer.step += 1
            settled(list(trainers.values()))
            saves_s[sync].append(timed_save(trainer))
        if ctx.is_main:
            size, disk = disk_for_newest_checkpoint(trainers["fsdp"].checkpoint_dir, workdir)
            disk_s.append(disk)
    for trainer in trainers.values():
        trainer.checkpoints.close()
    dist.barrier()
    if ctx.is_main:
        (workdir / "disk-baseline.bin").unlink(missing_ok=True)
        shutil.rmtree(workdir / "saves", ignore_errors=True)
    return {**asdict(v), "ranks": ctx.world_size, "saves_s": saves_s, "disk_write_s": disk_s,
            "sharded_checkpoint_bytes": size}  # fmt: skip


def timed_resume(trainer: Trainer) -> float:
    """One resume as a restarted job makes it: choose the newest checkpoint, verify its files, load them."""
    dist.barrier()
    started = time.perf_counter()
    trainer.resume()
    dist.barrier()
    return time.perf_counter() - started


def measure_reshard(v: Variant, ctx, rounds: int, workdir: Path, kept: Path) -> dict:
    """At RESHARD_RANKS ranks: resume from the RANKS-rank checkpoint (resharded while loading) against resume
    from a checkpoint of the same shapes and size written at RESHARD_RANKS ranks; the two alternate."""
    resharded = make_trainer(v, ctx, workdir / "resharded", "fsdp")
    same = make_trainer(v, ctx, workdir / "same", "fsdp")
    training.loop_step(same)()
    settled([same])
    timed_save(same)
    if ctx.is_main:
        saved = list_checkpoints(kept)[0]
        shutil.copytree(saved, resharded.checkpoint_dir / saved.name)
    dist.barrier()
    loads_s: dict[str, list[float]] = {"resharded": [], "same": []}
    for _ in range(rounds):
        loads_s["resharded"].append(timed_resume(resharded))
        loads_s["same"].append(timed_resume(same))
    if resharded.resumed_from is None or same.resumed_from is None:
        raise RuntimeError("a resume found no checkpoint to load: the resharding figure would time nothing")
    dist.barrier()
    if ctx.is_main:
        for folder in (workdir / "resharded", workdir / "same", kept):
            shutil.rmtree(folder, ignore_errors=True)
    return {**asdict(v), "ranks": ctx.world_size, "saved_at_ranks": RANKS, "resume_s": loads_s}


def measure_all(variants: list[Variant], ctx, budget_s: float, rounds: int, workdir: Path) -> list[dict]:
    # One worker module, two runs: the RANKS-rank run leaves its checkpoint for the RESHARD_RANKS-rank one.
    (v,) = [v for v in variants if not v.saves_only]  # one checkpoint is kept between the runs
    kept = workdir.parent / SAVED_AT_RANKS
    # Automatic garbage collection off, as in fit's loop; the young collection fit makes at step boundaries
    # runs before each timed save (settled).
    with StepAlignedGC(TrainConfig.gc_every_steps):  # the default
        if ctx.world_size == RESHARD_RANKS:
            rows = [measure_reshard(v, ctx, rounds, workdir, kept)]
        else:
            rows = [measure(v, ctx, budget_s, rounds, workdir, kept)]
        # The big state's saves at both rank counts: at RESHARD_RANKS (2), each rank has a core of its own here.
        return rows + [measure_saves(s, ctx, rounds, workdir) for s in variants if s.saves_only]


def figures_for(rows: list[dict]) -> list[Figure]:
    figures = []
    for r in rows:
        if "resume_s" in r:
            figures.append(
                Figure.from_rounds("sharding", f"{r['name']}: resume at {r['ranks']} ranks from a checkpoint "
                                   f"written at {r['saved_at_ranks']} (resharded)", "s", r["resume_s"]["resharded"],
                                   f"resume from one written at {r['ranks']}", r["resume_s"]["same"],
                                   higher_is_better=False)
            )  # fmt: skip
            continue
        if r["saves_only"]:
            figures.extend(save_figures(r))
            continue
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
        figures.extend(save_figures(r))
        figures.append(
            Figure.from_rounds("sharding", f"{r['name']}: training blocked by an asynchronous sharded save", "s",
                               r["async_stall_s"], "synchronous sharded save", r["saves_s"]["fsdp"],
                               higher_is_better=False, target=1 / ASYNC_STALL_TARGET)
        )  # fmt: skip
        figures.append(
            Figure.from_rounds("sharding", f"{r['name']}: training blocked by an attempt's first asynchronous "
                               "sharded save (it allocates the staging buffers)", "s", [r["async_first_stall_s"]],
                               "synchronous sharded save (median)", [statistics.median(r["saves_s"]["fsdp"])],
                               higher_is_better=False)
        )  # fmt: skip
    return figures


def save_figures(r: dict) -> list[Figure]:
    """A sharded save against rank 0 writing the whole state, and against the disk writing as many bytes."""
    size = f"{r['sharded_checkpoint_bytes'] / 1e6:.0f} MB checkpoint"
    figures = [
        Figure.from_rounds("sharding", f"{r['name']}: sharded save ({r['ranks']} ranks write their shards, {size})",
                           "s", r["saves_s"]["fsdp"], "rank 0 writes the whole state (DDP)", r["saves_s"]["ddp"],
                           higher_is_better=False)
    ]  # fmt: skip
    if r["disk_write_s"]:
        figures.append(
            Figure.from_rounds("sharding",
                               f"{r['name']}: sharded save at {r['ranks']} ranks against the disk, same bytes ({size})",
                               "s", r["saves_s"]["fsdp"], "one write + fsync of as many bytes", r["disk_write_s"],
                               higher_is_better=False, target=DISK_TARGET)
        )  # fmt: skip
    return figures


VARIANTS = [Variant("byte LM, 4 layers x 256 wide", block_size=64, d_model=256, n_layer=4, per_rank_batch=8)]
QUICK_VARIANTS = [Variant("byte LM, 2 layers x 128 wide", block_size=32, d_model=128, n_layer=2, per_rank_batch=4)]
# The saves of a state where bytes, not tensors, dominate: as many tensors as above (52 parameters, each with
# AdamW's two moments), 9x the bytes (343 MB against 39 MB).
SAVE_VARIANTS = [Variant("byte LM, 4 layers x 768 wide", block_size=64, d_model=768, n_layer=4, per_rank_batch=2,
                         saves_only=True)]  # fmt: skip
QUICK_SAVE_VARIANTS = [Variant("byte LM, 1 layer x 256 wide", block_size=32, d_model=256, n_layer=1, per_rank_batch=2,
                               saves_only=True)]  # fmt: skip


def run(quick: bool, workdir: Path) -> BenchResult:
    budget_s, rounds = (0.2, 1) if quick else (1.0, 3)
    result = BenchResult("sharding", quick, {"budget_s": budget_s, "rounds": rounds, "cpu_cores": os.cpu_count()})
    variants = QUICK_VARIANTS + QUICK_SAVE_VARIANTS if quick else VARIANTS + SAVE_VARIANTS
    try:
        for ranks in (RANKS, RESHARD_RANKS):  # in this order: the second resumes from the first one's checkpoint
            result.measurements.extend(training.measure_on_ranks(__name__, ranks, variants, budget_s, rounds, workdir))
    finally:
        shutil.rmtree(workdir / SAVED_AT_RANKS, ignore_errors=True)
    result.figures = figures_for(result.measurements)
    result.notes.append(
        "Memory counts each rank's parameter, gradient and optimizer-state bytes after a step (sharded tensors: "
        "the local shard). FSDP keeps what no unit holds (here the embeddings, final norm and head) in the root "
        "unit, sharded too; the unsharded, gathered parameters of the unit running are transient and not counted."
    )
    result.notes.append(
        "Each save is timed with the disk settled: earlier writes flushed, the deletions of older checkpoints that "
        "the saves before it began finished, and the young garbage collection fit makes at step boundaries done; in "
        f"training all three happen between saves. The big state's saves are timed at {RESHARD_RANKS} ranks too "
        f"({os.cpu_count()} cores here). A round's asynchronous stall is the median of {STALLS_PER_ROUND} saves "
        "(each the slowest rank's); the synchronous save it is set against, one save a round."
    )
    if (os.cpu_count() or 1) < RANKS:
        result.notes.append(
            f"{RANKS} ranks on {os.cpu_count()} cores: tokens/s and save times compare FSDP and DDP on the same "
            "oversubscribed cores, not what either reaches on its own hardware."
        )
    return result


if __name__ == "__main__":
    training.variants_worker(Variant, measure_all, __doc__.splitlines()[0])
