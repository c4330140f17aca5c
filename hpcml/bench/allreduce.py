"""All-reduce bandwidth of hpcml's gradient sync against the raw libraries, on the same ranks.

Each path sums a float32 buffer over all ranks, back to back, timed as nccl-tests do:
- raw gloo: `torch.distributed.all_reduce(tensor)`;
- raw MPI: mpi4py `Allreduce(IN_PLACE, SUM)` (hpcml.compute.mpi's wrapper is that one call);
- hpcml DDP path: what hpcml's DDP comm hook runs on a gradient bucket of that size (transport choice
  from this job's probe, then the all-reduce); DDP's own bucketing cost shows in the training benchmark;
- hpcml flat path: `FlatGradientSync.synchronize()` (train.grad_sync=flat) of a model whose gradients
  are that big, on the transport its own probe chose.
Both hpcml paths run with train.transport=auto, the default.
Paths alternate in rounds, so drift hits all alike. algbw = bytes / time, busbw = algbw x 2(n-1)/n.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from hpcml.bench.launch import Layout, cluster_is_up, run_worker
from hpcml.bench.record import BenchResult, Figure, busbw
from hpcml.compute import mpi
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


def _measure_size(nbytes: int, budget_s: float, rounds: int, ctx) -> dict[str, float]:
    """Seconds per all-reduce of `nbytes` on each path (the slowest rank's mean, best of `rounds`)."""
    numel = nbytes // 4
    world = mpi.world()
    cfg = TrainConfig(ddp_bucket_cap_mb=max(25.0, 2 * nbytes / MB))
    ddp = DDPGradientSync(ParamBlock(numel), ctx, cfg)
    ddp.settle(lambda module: module(torch.ones(numel)))  # builds the transport plan, as in training
    flat = FlatGradientSync(ParamBlock(numel), ctx, cfg)
    flat.settle(lambda module: module(torch.ones(numel)))
    tensor, bucket = torch.ones(numel), torch.ones(numel)
    ops = {
        "raw_gloo": lambda: dist.all_reduce(tensor),
        "raw_mpi": lambda: world.allreduce_sum_(tensor.numpy()),
        "hpcml_ddp": lambda: ddp.reduce_bucket(0, bucket).wait(),
        "hpcml_flat": flat.synchronize,
    }
    iters = {name: iterations_for(op, budget_s) for name, op in ops.items()}
    best = {name: float("inf") for name in ops}
    for _ in range(rounds):
        for name, op in ops.items():
            best[name] = min(best[name], mean_time(op, iters[name], warmup=0))
    best["ddp_transport"] = ddp.selector.for_bytes(nbytes)
    best["flat_transport"] = flat.selector.for_bytes(nbytes)
    return best


def worker(out: Path, sizes: list[int], budget_s: float, rounds: int) -> None:
    ctx = setup_distributed(detect_environment(), "gloo", timeout_s=600)
    torch.set_num_threads(1)
    rows = []
    for nbytes in sizes:
        times = _measure_size(nbytes, budget_s, rounds, ctx)
        row = {
            "bytes": nbytes,
            "ranks": ctx.world_size,
            "nodes": ctx.placement.num_nodes,
            "ddp_transport": times.pop("ddp_transport"),
            "flat_transport": times.pop("flat_transport"),
        }
        for path in PATHS:
            algbw = nbytes / times[path] / 1e9
            row[path] = {"time_s": times[path], "algbw_GBps": algbw, "busbw_GBps": busbw(algbw, ctx.world_size)}
        rows.append(row)
    teardown_distributed()
    if ctx.is_main:
        out.write_text(json.dumps(rows))


def _size_label(nbytes: int) -> str:
    return f"{nbytes // MB} MB" if nbytes >= MB else f"{nbytes >> 10} KB"


def figures_for(layout: str, rows: list[dict]) -> list[Figure]:
    """Per size >= 1 MB: each hpcml path's busbw against the better raw path's."""
    figures = []
    for row in rows:
        if row["bytes"] < TARGET_FROM_BYTES:
            continue
        better = max(("raw_gloo", "raw_mpi"), key=lambda p: row[p]["busbw_GBps"])
        for path in ("hpcml_ddp", "hpcml_flat"):
            figures.append(
                Figure(
                    benchmark="allreduce",
                    name=f"{path} busbw, {_size_label(row['bytes'])}, {layout}",
                    unit="GB/s",
                    value=row[path]["busbw_GBps"],
                    baseline_name=better,
                    baseline=row[better]["busbw_GBps"],
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
    """Between nodes (TCP) one path's time varies much more from round to round; more rounds let the best
    one stand for it."""
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
