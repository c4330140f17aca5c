"""All-reduce bandwidth of hpcml's gradient sync against the raw libraries, on the same ranks.

Each path sums a float32 buffer over all ranks, back to back, timed as nccl-tests do:
- raw gloo: `torch.distributed.all_reduce(tensor)`;
- raw MPI: mpi4py `Allreduce(IN_PLACE, SUM)` (hpcml.compute.mpi's wrapper is that one call);
- hpcml DDP path: torch's DistributedDataParallel, as `DDPGradientSync` builds it for training (with the
  comm hook it registers to send each bucket over the transport this job's probe chose), on a model whose
  gradient is one bucket of that size. Its all-reduce time is a backward through DDP's reducer (bucket
  copy, hook, all-reduce, finalise) less the same forward and backward under `no_sync()`, timed in the
  same round: what DDP's gradient sync adds to a step, with the gradient's own computation taken out;
- hpcml flat path: `FlatGradientSync.synchronize()` (train.grad_sync=flat) of a model whose gradients
  are that big, on the transport its own probe chose.
Both hpcml paths run with train.transport=auto, the default. Paths alternate in rounds, so drift hits
all alike, and every round's time is kept: a figure is the median round, with the rounds' spread.
algbw = bytes / time, busbw = algbw x 2(n-1)/n.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from hpcml.bench.launch import Layout, cluster_is_up, run_worker
from hpcml.bench.record import BenchResult, Figure, busbw
from hpcml.compute import mpi, transport
from hpcml.compute.dist import setup_distributed, teardown_distributed
from hpcml.compute.env import detect_environment
from hpcml.compute.gradsync import DDPGradientSync, FlatGradientSync
from hpcml.compute.transport import iterations_for, mean_time
from hpcml.config import TrainConfig

MB = 1 << 20
FULL_SIZES = [4 << 10 << (2 * i) for i in range(9)]  # 4 KB, 16 KB, ..., 256 MB
QUICK_SIZES = [4 << 10, 64 << 10, 1 * MB, 4 * MB]
PATHS = ("raw_gloo", "raw_mpi", "hpcml_ddp", "hpcml_flat")
TARGET = 0.95  # hpcml within 5% of the better raw path
TARGET_FROM_BYTES = 1 * MB


class ParamBlock(nn.Module):
    """One flat parameter whose gradient is as big as the buffer under test; backward costs one pass."""

    def __init__(self, numel: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(numel))

    def forward(self, coeff: torch.Tensor) -> torch.Tensor:
        return (self.weight * coeff).sum()


class DDPBackward:
    """Forward and backward of a `ParamBlock` through the DistributedDataParallel training builds: one
    parameter, so its gradient is one bucket of exactly that size, reduced by hpcml's comm hook."""

    def __init__(self, numel: int, ctx, cfg: TrainConfig):
        self.sync = DDPGradientSync(ParamBlock(numel), ctx, cfg)
        self.coeff = torch.ones(numel)
        # The throwaway backward that lays the bucket out, then the transport probe (auto), as in training.
        self.sync.settle(lambda module: module(self.coeff))
        # Only for zero_grad, as the trainer calls it; never stepped.
        self.optimizer = torch.optim.SGD(self.sync.module.parameters(), lr=0.0)

    @property
    def uses_comm_hook(self) -> bool:
        """Whether hpcml's hook reduces the bucket (auto or mpi), not DDP's built-in gloo path (torch)."""
        return self.sync.selector.requested != transport.TORCH

    def synced(self) -> None:
        """A training step's gradient work: zero_grad, forward, backward with DDP's all-reduce of the bucket."""
        self.sync.zero_grad(self.optimizer)
        self.sync.backward(self.sync.module(self.coeff))
        self.sync.synchronize()

    def local(self) -> None:
        """The same with no gradient communication: what `synced` costs without DDP's all-reduce."""
        with self.sync.module.no_sync():
            self.synced()


def _measure_size(nbytes: int, budget_s: float, rounds: int, ctx) -> dict:
    """Per path, seconds per all-reduce of `nbytes` in each round (the slowest rank's mean over a batch of
    calls); the rounds alternate the paths, so round i of every path saw the same drift."""
    numel = nbytes // 4
    world = mpi.world()
    cfg = TrainConfig(ddp_bucket_cap_mb=max(25.0, 2 * nbytes / MB))
    ddp = DDPBackward(numel, ctx, cfg)
    flat = FlatGradientSync(ParamBlock(numel), ctx, cfg)
    flat.settle(lambda module: module(torch.ones(numel)))
    tensor = torch.ones(numel)
    ops: dict[str, Callable[[], object]] = {
        "raw_gloo": lambda: dist.all_reduce(tensor),
        "raw_mpi": lambda: world.allreduce_sum_(tensor.numpy()),
        "ddp_backward": ddp.synced,
        "ddp_backward_no_sync": ddp.local,
        "hpcml_flat": flat.synchronize,
    }
    iters = {name: iterations_for(op, budget_s) for name, op in ops.items()}
    per_round: dict[str, list[float]] = {name: [] for name in ops}
    for _ in range(rounds):
        for name, op in ops.items():
            per_round[name].append(mean_time(op, iters[name], warmup=0))
    # DDP's all-reduce, as a step pays it: its backward less the same backward without sync, round by round.
    # Floored at a nanosecond: at sizes where the difference drowns in noise it must not turn negative.
    per_round["hpcml_ddp"] = [
        max(synced - local, 1e-9)
        for synced, local in zip(per_round["ddp_backward"], per_round["ddp_backward_no_sync"], strict=True)
    ]
    return {
        "rounds_s": per_round,
        "ddp_transport": ddp.sync.selector.for_bytes(nbytes),
        "ddp_comm_hook": ddp.uses_comm_hook,
        "flat_transport": flat.selector.for_bytes(nbytes),
    }


def worker(out: Path, sizes: list[int], budget_s: float, rounds: int) -> None:
    ctx = setup_distributed(detect_environment(), "gloo", timeout_s=600)
    torch.set_num_threads(1)
    rows = []
    for nbytes in sizes:
        measured = _measure_size(nbytes, budget_s, rounds, ctx)
        row = {
            "bytes": nbytes,
            "ranks": ctx.world_size,
            "nodes": ctx.placement.num_nodes,
            "ddp_transport": measured["ddp_transport"],
            "ddp_comm_hook": measured["ddp_comm_hook"],
            "flat_transport": measured["flat_transport"],
            # DDP's whole forward + backward, with and without its all-reduce (hpcml_ddp is the difference).
            "ddp_backward_rounds_s": measured["rounds_s"]["ddp_backward"],
            "ddp_backward_no_sync_rounds_s": measured["rounds_s"]["ddp_backward_no_sync"],
        }
        for path in PATHS:
            times = measured["rounds_s"][path]
            busbws = [busbw(nbytes / t / 1e9, ctx.world_size) for t in times]
            median_s = statistics.median(times)
            row[path] = {
                "time_s": median_s,
                "algbw_GBps": nbytes / median_s / 1e9,
                "busbw_GBps": busbw(nbytes / median_s / 1e9, ctx.world_size),
                "rounds_time_s": times,
                "rounds_busbw_GBps": busbws,
            }
        rows.append(row)
    teardown_distributed()
    if ctx.is_main:
        out.write_text(json.dumps(rows))


def _size_label(nbytes: int) -> str:
    return f"{nbytes // MB} MB" if nbytes >= MB else f"{nbytes >> 10} KB"


def figures_for(layout: str, rows: list[dict]) -> list[Figure]:
    """Per size >= 1 MB: each hpcml path's busbw against the better raw path's (by median), round by round."""
    figures = []
    for row in rows:
        if row["bytes"] < TARGET_FROM_BYTES:
            continue
        better = max(("raw_gloo", "raw_mpi"), key=lambda p: row[p]["busbw_GBps"])
        for path in ("hpcml_ddp", "hpcml_flat"):
            figures.append(
                Figure.from_rounds(
                    benchmark="allreduce",
                    name=f"{path} busbw, {_size_label(row['bytes'])}, {layout}",
                    unit="GB/s",
                    values=row[path]["rounds_busbw_GBps"],
                    baseline_name=better,
                    baselines=row[better]["rounds_busbw_GBps"],
                    higher_is_better=True,
                    target=TARGET,
                )
            )
    return figures


def layouts(quick: bool) -> list[Layout]:
    chosen = [Layout.local(2)] if quick else [Layout.local(2), Layout.local(4)]
    if not quick and cluster_is_up():
        chosen.append(Layout.cluster(nodes=2, tasks_per_node=2))
    return chosen


def rounds_for(layout: Layout, quick: bool) -> int:
    """Between nodes (TCP) one path's time varies much more from round to round; more rounds steady the
    median."""
    if quick:
        return 2
    return 5 if layout.nodes > 1 else 3


def run(quick: bool, workdir: Path) -> BenchResult:
    sizes = QUICK_SIZES if quick else FULL_SIZES
    budget_s = 0.02 if quick else 0.25
    result = BenchResult("allreduce", quick, {"sizes_bytes": sizes, "budget_s": budget_s})
    for layout in layouts(quick):
        rounds = rounds_for(layout, quick)
        args = ["--sizes", *map(str, sizes), "--budget-s", str(budget_s), "--rounds", str(rounds)]
        rows = run_worker(layout, __name__, args, timeout_s=1800, cwd=workdir)
        for row in rows:
            row["layout"], row["rounds"] = layout.name, rounds
        result.measurements.extend(rows)
        result.figures.extend(figures_for(layout.name, rows))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sizes", type=int, nargs="+", required=True)
    parser.add_argument("--budget-s", type=float, default=0.25)
    parser.add_argument("--rounds", type=int, default=3)
    a = parser.parse_args()
    worker(a.out, a.sizes, a.budget_s, a.rounds)


if __name__ == "__main__":
    main()
