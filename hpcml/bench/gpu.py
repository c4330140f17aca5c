"""The GPU path: training steps on CUDA devices against a hand-written loop, and checkpoints of state
that lives on the GPU. Skipped (not failed) where no CUDA device is visible.

- training: one rank per visible GPU (NCCL), the loop's whole step as the training benchmark's `loop step`
  rows time it on CPU (`Trainer.train_step()`: batch gather, forward, backward with DDP's NCCL all-reduce
  when there are peers, optimizer and schedule; then the step-boundary stop agreement) against the loop
  a user writes by hand for the same model, optimizer and batches, with the data already on the GPU
  (DDP-wrapped when there are peers). Each is timed over blocks of steps ended by a device synchronise,
  so queued GPU work counts, in rounds that alternate the two. Compute-bound and overhead-bound (small
  batch, big model) sizes.
- checkpoints: the checkpoint benchmark with its training state on the GPU: save (copy to host inside
  the writer), load (to the GPU), and what an async save (the copy into pinned host memory runs on the
  writer thread) costs training per save against a synchronous one: the slowdown, and the blocked time.
NCCL all-reduce bandwidth needs at least two GPUs; with one, NCCL has no peer and busbw is zero by
definition, so it is left to nccl-tests-style runs on a multi-GPU node (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from hpcml.bench import checkpoints, training
from hpcml.bench.launch import BenchmarkSkipped, Layout, run_worker
from hpcml.bench.record import BenchResult, Figure
from hpcml.compute.dist import setup_distributed, teardown_distributed
from hpcml.compute.env import detect_environment
from hpcml.compute.parts import build_model, build_optimizer
from hpcml.compute.trainer import Trainer
from hpcml.compute.transport import iterations_for, mean_time

# Steps per timed block: the CPU may run ahead of the GPU inside a block, as it does in training.
BLOCK_STEPS = 10
VARIANTS = (
    replace(training.COMPUTE_BOUND, per_rank_batch=4096),
    replace(training.COMM_BOUND, name="overhead-bound", width=2048, per_rank_batch=64),
)
TARGET = 0.95  # hpcml's step within 5% of the hand-written one


class HandWrittenLoop:
    """What a user writes without a framework: the same model, optimizer and batches, data on the GPU."""

    def __init__(self, trainer: Trainer):
        cfg, ctx = trainer.cfg, trainer.ctx
        model = build_model(cfg, ctx.device)
        self.model = DistributedDataParallel(model, device_ids=[ctx.device.index]) if ctx.world_size > 1 else model
        self.optimizer = build_optimizer(cfg, self.model.parameters())
        self.x, self.y = (t.to(ctx.device) for t in trainer.train_data.tensors)
        self.stream, self.rank, self.world_size = trainer.stream, ctx.rank, ctx.world_size
        self.step_number = 0

    def step(self) -> None:
        idx = torch.from_numpy(self.stream.rank_batch(self.step_number, self.rank, self.world_size))
        idx = idx.to(self.x.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(self.model(self.x[idx]), self.y[idx]).backward()
        self.optimizer.step()
        self.step_number += 1


def _block(step: Callable[[], object], device: torch.device) -> Callable[[], None]:
    def run() -> None:
        for _ in range(BLOCK_STEPS):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return run


def measure(v: training.Variant, ctx, budget_s: float, rounds: int, workdir: Path) -> dict:
    """Seconds per step of hpcml's whole loop step and of the hand-written loop's, in each of `rounds`
    rounds that alternate the two, and the medians."""
    trainer = training.make_trainer(v, ctx, workdir)
    loop = HandWrittenLoop(trainer)
    blocks = {"hpcml": _block(training.loop_step(trainer), ctx.device), "hand_written": _block(loop.step, ctx.device)}
    iters = iterations_for(blocks["hpcml"], budget_s)
    rounds_s: dict[str, list[float]] = {name: [] for name in blocks}
    for _ in range(rounds):
        for name, block in blocks.items():
            rounds_s[name].append(mean_time(block, iters, warmup=1) / BLOCK_STEPS)
    global_batch = v.per_rank_batch * ctx.world_size
    median = {name: statistics.median(seconds) for name, seconds in rounds_s.items()}
    return {
        **asdict(v),
        "ranks": ctx.world_size,
        "params": sum(p.numel() for p in trainer.model.parameters()),
        "data_on_gpu": trainer.train_data.tensors[0].is_cuda,
        "hpcml_times": "train_step() + step-boundary stop agreement",
        **{f"{name}_step_s": seconds for name, seconds in median.items()},
        **{f"{name}_samples_per_s": global_batch / seconds for name, seconds in median.items()},
        "rounds_s": rounds_s,
    }


def figures_for(rows: list[dict]) -> list[Figure]:
    """Per variant: samples/s of hpcml's loop step against the hand-written loop's, round by round."""
    figures = []
    for r in rows:
        global_batch = r["per_rank_batch"] * r["ranks"]
        figures.append(
            Figure.from_rounds(
                "gpu",
                f"{r['name']} loop step (step + stop agreement) samples/s, {r['ranks']} GPU(s), "
                f"batch {r['per_rank_batch']}/GPU",
                "samples/s",
                [global_batch / s for s in r["rounds_s"]["hpcml"]],
                "hand-written loop",
                [global_batch / s for s in r["rounds_s"]["hand_written"]],
                higher_is_better=True,
                target=TARGET,
            )
        )
    return figures


def worker(out: Path, budget_s: float, rounds: int) -> None:
    ctx = setup_distributed(detect_environment(), "nccl", timeout_s=600)
    rows = [measure(v, ctx, budget_s, rounds, out.parent) for v in VARIANTS]
    teardown_distributed()
    if ctx.is_main:
        out.write_text(json.dumps(rows))


def device_facts() -> dict:
    props = torch.cuda.get_device_properties(0)
    return {
        "gpu": props.name,
        "gpus": torch.cuda.device_count(),
        "gpu_memory_gb": props.total_memory / 1e9,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())),
    }


def run(quick: bool, workdir: Path) -> BenchResult:
    if not torch.cuda.is_available():
        raise BenchmarkSkipped("no CUDA device visible; run it on a GPU node")
    budget_s, rounds = (0.2, 2) if quick else (1.0, 3)
    target_bytes, repeats = (64 * checkpoints.MB, 2) if quick else (1024 * checkpoints.MB, 3)
    gpus = torch.cuda.device_count()
    result = BenchResult("gpu", quick, {**device_facts(), "budget_s": budget_s, "rounds": rounds})
    args = ["--budget-s", str(budget_s), "--rounds", str(rounds)]
    rows = run_worker(Layout.local(gpus), __name__, args, timeout_s=1800, cwd=workdir)
    result.measurements.extend(rows)
    result.figures += figures_for(rows)
    m = checkpoints.measure(workdir, target_bytes, repeats, device=torch.device("cuda", 0))
    m["name"] = "checkpoints, state on the GPU"
    result.measurements.append(m)
    result.figures += checkpoints.figures_for(m, benchmark="gpu", where="on the GPU")
    if gpus < 2:
        result.notes.append("one GPU: no NCCL all-reduce between GPUs to measure (see docs/PERFORMANCE.md)")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budget-s", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3)
    a = parser.parse_args()
    worker(a.out, a.budget_s, a.rounds)


if __name__ == "__main__":
    main()
