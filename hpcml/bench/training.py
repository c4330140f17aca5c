"""Training throughput of hpcml's Trainer at 1, 2 and 4 ranks, and what DDP's knobs do to it.

Each variant builds a real `Trainer` on a synthetic problem and times `train_step()` (data slice,
forward, backward with gradient sync, optimizer step) against the same step without gradient sync
(DDP's `no_sync()`, or the flat path's all-reduce skipped). All variants of one rank count are built
first and then timed in rounds, each round timing every variant's every path once, so the knobs are
compared with the defaults round by round; every round's time is kept. So every rank count
gives samples/s, the share of the step spent waiting on communication (1 - local / synced), and,
against one rank, the scaling efficiency. The two main variants also time the loop's whole step: the
step plus the step-boundary stop agreement every rank makes (over MPI under an MPI launcher, as in
training), against the same agreement over torch.distributed. The per-rank batch is fixed (weak
scaling), as data-parallel jobs usually grow. Two model sizes: compute-bound (wide batch, small model) and communication-bound
(big model, small batch); the latter also sweeps DDP's bucket size and gradient-as-bucket-view, and
hpcml's transport choice against DDP's built-in gloo path. Scaling figures compare with the 1-rank
run, a separate launch: their rounds are paired by number, not alternated.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from hpcml.bench.launch import Layout, run_worker
from hpcml.bench.record import BenchResult, Figure
from hpcml.compute.dist import setup_distributed, teardown_distributed
from hpcml.compute.env import detect_environment
from hpcml.compute.preempt import PreemptionGuard, StopCoordinator
from hpcml.compute.runtime import stop_coordinator
from hpcml.compute.trainer import Trainer
from hpcml.compute.transport import iterations_for, mean_time
from hpcml.config import TrainConfig, TrainJobConfig


@dataclass(frozen=True)
class Variant:
    name: str
    width: int
    depth: int
    input_dim: int
    per_rank_batch: int
    grad_sync: str = "ddp"
    transport: str = "auto"
    bucket_mb: float = 25.0
    bucket_view: bool = True


COMPUTE_BOUND = Variant("compute-bound", width=256, depth=3, input_dim=256, per_rank_batch=512)
COMM_BOUND = Variant("comm-bound", width=1024, depth=3, input_dim=256, per_rank_batch=8)


def mlp_node(input_dim: int, width: int, depth: int, num_classes: int = 10) -> dict:
    """conf/model/mlp.yaml's node, for configs built in Python."""
    return {
        "_target_": "hpcml.compute.models.MLP",
        "input_dim": input_dim,
        "num_classes": num_classes,
        "width": width,
        "depth": depth,
    }


def synthetic_node(num_samples: int, input_dim: int, num_classes: int = 10) -> dict:
    """conf/data/synthetic.yaml's node, for configs built in Python."""
    split = {"_target_": "hpcml.compute.datasets.synthetic", "num_samples": num_samples, "input_dim": input_dim}
    return {
        "input_dim": input_dim,
        "num_classes": num_classes,
        "train": {**split, "num_classes": num_classes, "split": "train"},
        "eval": {**split, "num_classes": num_classes, "split": "test"},
    }


def make_trainer(v: Variant, ctx, workdir: Path) -> Trainer:
    """A settled Trainer for variant `v` on this job's ranks, ready for `train_step()`."""
    global_batch = v.per_rank_batch * ctx.world_size
    cfg = TrainJobConfig(
        model=mlp_node(v.input_dim, width=v.width, depth=v.depth),
        data=synthetic_node(num_samples=max(4096, 8 * global_batch), input_dim=v.input_dim),
        train=TrainConfig(
            steps=10**9,
            global_batch_size=global_batch,
            grad_sync=v.grad_sync,
            transport=v.transport,
            ddp_bucket_cap_mb=v.bucket_mb,
            gradient_as_bucket_view=v.bucket_view,
            output_dir=str(workdir),
        ),
    )
    trainer = Trainer(cfg, ctx, stop_coordinator(cfg, ctx, PreemptionGuard([])))
    trainer.settle()
    return trainer


def _without_sync(trainer: Trainer):
    """A context in which train_step() does no gradient communication."""
    if hasattr(trainer.sync.module, "no_sync"):
        return trainer.sync.module.no_sync()
    sync = trainer.sync

    class _Skip:
        def __enter__(self):
            self.saved = sync.synchronize
            sync.synchronize = lambda: None

        def __exit__(self, *exc):
            sync.synchronize = self.saved

    return _Skip()


def loop_step(trainer: Trainer, stop: StopCoordinator | None = None) -> Callable[[], None]:
    """The loop's whole step, as `Trainer.fit()` runs it between saves: `train_step()` and the step-boundary
    decision (the stop agreement every rank makes). `stop`, if given, replaces the trainer's agreement."""
    stop = stop or trainer.stop

    def step() -> None:
        trainer.stop = stop
        trainer.train_step()
        trainer.boundary_decision()

    return step


def timed_paths(v: Variant, trainer: Trainer, ctx) -> dict[str, Callable[[], None]]:
    """What is timed of variant `v`: its step with and without gradient sync, and for the two main variants
    the loop's whole step with the agreement as training makes it and over torch.distributed."""

    def synced() -> None:
        trainer.train_step()

    def local() -> None:
        with _without_sync(trainer) if ctx.world_size > 1 else nullcontext():
            trainer.train_step()

    paths = {"synced": synced, "local": local}
    if v.name in (COMPUTE_BOUND.name, COMM_BOUND.name) and ctx.world_size > 1:
        paths["loop"] = loop_step(trainer)
        paths["loop_torch_agreement"] = loop_step(trainer, replace(trainer.stop, over_mpi=False))
    return paths


def row_for(v: Variant, trainer: Trainer, ctx, rounds_s: dict[str, list[float]]) -> dict:
    """Variant `v`'s measurement: medians over rounds, and every round's seconds per step per path."""
    median = {name: statistics.median(times) for name, times in rounds_s.items()}
    loop = {}
    if "loop" in median:
        loop = {
            "loop_step_s": median["loop"],
            "loop_torch_agreement_step_s": median["loop_torch_agreement"],
            "agreement_over_mpi": ctx.uses_mpi,
        }
    params = sum(p.numel() for p in trainer.model.parameters())
    shares = [max(0.0, 1 - local / synced) for synced, local in zip(rounds_s["synced"], rounds_s["local"], strict=True)]
    return {
        **loop,
        **asdict(v),
        "ranks": ctx.world_size,
        "params": params,
        "grad_mb": params * 4 / 2**20,
        "step_s": median["synced"],
        "local_step_s": median["local"],
        "samples_per_s": v.per_rank_batch * ctx.world_size / median["synced"],
        "comm_wait_share": statistics.median(shares),
        "rounds_s": rounds_s,
        "transport_plan": trainer.sync.state_dict().get("transport_plan"),
    }


def measure(variants: list[Variant], ctx, budget_s: float, rounds: int, workdir: Path) -> list[dict]:
    """Every variant built and settled first, then `rounds` rounds, each timing every path of every variant
    once: a knob and the defaults see the same drift, and so do a step and its baseline."""
    trainers = [make_trainer(v, ctx, workdir) for v in variants]
    paths = [timed_paths(v, t, ctx) for v, t in zip(variants, trainers, strict=True)]
    iters = [iterations_for(p["synced"], budget_s) for p in paths]
    rounds_s: list[dict[str, list[float]]] = [{name: [] for name in p} for p in paths]
    for _ in range(rounds):
        for p, n, times in zip(paths, iters, rounds_s, strict=True):
            for name, op in p.items():
                times[name].append(mean_time(op, n, warmup=0))
    return [row_for(v, t, ctx, r) for v, t, r in zip(variants, trainers, rounds_s, strict=True)]


def variants_worker(variant_type: type, measure_all: Callable[..., list[dict]], description: str) -> None:
    """`python -m <benchmark> --worker --out F --variants JSON --budget-s S --rounds N` on every rank: the
    variants measured by `measure_all(variants, ctx, budget_s, rounds, workdir)`, rank 0's rows to F (the
    training and seam benchmarks)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--worker", action="store_true", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--variants", type=str, required=True)
    parser.add_argument("--budget-s", type=float, required=True)
    parser.add_argument("--rounds", type=int, required=True)
    a = parser.parse_args()
    ctx = setup_distributed(detect_environment(), "gloo", timeout_s=600)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    variants = [variant_type(**v) for v in json.loads(a.variants)]
    rows = measure_all(variants, ctx, a.budget_s, a.rounds, a.out.parent)
    # The trainers' DDP and FSDP state hold the process group through reference cycles: freed now, before it is
    # torn down, not in the collector's last pass at exit (as hpcml.compute.runtime does).
    gc.collect()
    teardown_distributed()
    if ctx.is_main:
        a.out.write_text(json.dumps(rows))


def plan(quick: bool) -> dict[int, list[Variant]]:
    """Rank count -> the variants measured at it."""
    ranks = (1, 2) if quick else (1, 2, 4)
    knob_ranks = ranks[-1]
    by_ranks = {n: [COMPUTE_BOUND, COMM_BOUND] for n in ranks}
    buckets = (1.0, 25.0) if quick else (1.0, 5.0, 25.0, 100.0)
    knobs = [
        replace(COMM_BOUND, name=f"comm-bound bucket {mb:g} MB view {view}", bucket_mb=mb, bucket_view=view)
        for mb in buckets
        for view in (True, False)
        if not (mb == COMM_BOUND.bucket_mb and view == COMM_BOUND.bucket_view)
    ]
    knobs.append(replace(COMM_BOUND, name="comm-bound transport torch", transport="torch"))
    knobs.append(replace(COMM_BOUND, name="comm-bound grad_sync flat", grad_sync="flat"))
    by_ranks[knob_ranks] = by_ranks[knob_ranks] + knobs
    return by_ranks


def _samples_per_s(r: dict, path: str) -> list[float]:
    """Each round's samples/s of row `r`'s `path`."""
    batch = r["per_rank_batch"] * r["ranks"]
    return [batch / seconds for seconds in r["rounds_s"][path]]


def figures_for(rows: list[dict]) -> list[Figure]:
    figures = []
    single = {r["name"]: r for r in rows if r["ranks"] == 1}
    for r in rows:
        if r["name"] in (COMPUTE_BOUND.name, COMM_BOUND.name) and r["ranks"] > 1 and r["name"] in single:
            one = _samples_per_s(single[r["name"]], "synced")
            figures.append(
                Figure.from_rounds(
                    "training",
                    f"{r['name']} samples/s, {r['ranks']} ranks (comm wait {100 * r['comm_wait_share']:.0f}% of a step)",
                    "samples/s",
                    _samples_per_s(r, "synced"),
                    f"{r['ranks']} x 1 rank",
                    [r["ranks"] * s for s in one],
                    higher_is_better=True,
                )
            )
    for r in rows:
        if "loop_step_s" in r:
            figures.append(
                Figure.from_rounds(
                    "training",
                    f"{r['name']} loop step (step + stop agreement), {r['ranks']} ranks",
                    "samples/s",
                    _samples_per_s(r, "loop"),
                    "agreement over torch.distributed",
                    _samples_per_s(r, "loop_torch_agreement"),
                    higher_is_better=True,
                )
            )
    top = max(r["ranks"] for r in rows)
    default = next(r for r in rows if r["name"] == COMM_BOUND.name and r["ranks"] == top)
    for r in rows:
        if r["name"].startswith("comm-bound ") and r["ranks"] == top:
            figures.append(
                Figure.from_rounds(
                    "training",
                    f"{r['name']}, {top} ranks",
                    "samples/s",
                    _samples_per_s(r, "synced"),
                    "hpcml defaults (25 MB, view, auto)",
                    _samples_per_s(default, "synced"),
                    higher_is_better=True,
                )
            )
    return figures


def measure_on_ranks(
    module: str, ranks: int, variants: list, budget_s: float, rounds: int, workdir: Path
) -> list[dict]:
    """Rank 0's rows for `variants`, measured by `python -m <module> --worker` (variants_worker) on `ranks`
    local ranks (the training, seam and lm benchmarks)."""
    args = ["--variants", json.dumps([asdict(v) for v in variants]), "--budget-s", str(budget_s)]
    return run_worker(Layout.local(ranks), module, [*args, "--rounds", str(rounds)], timeout_s=1800, cwd=workdir)


def run(quick: bool, workdir: Path) -> BenchResult:
    budget_s, rounds = (0.15, 2) if quick else (0.5, 3)
    result = BenchResult("training", quick, {"budget_s": budget_s, "rounds": rounds, "cpu_cores": os.cpu_count()})
    for ranks, variants in plan(quick).items():
        result.measurements.extend(measure_on_ranks(__name__, ranks, variants, budget_s, rounds, workdir))
    result.figures = figures_for(result.measurements)
    cores = os.cpu_count() or 1
    if cores < 4:
        result.notes.append(
            f"this machine has {cores} cores: with one thread per rank, more than {cores} ranks share cores, "
            f"so scaling efficiency beyond {cores} ranks measures oversubscription, not hpcml."
        )
    return result


if __name__ == "__main__":
    variants_worker(Variant, measure, __doc__.splitlines()[0])
