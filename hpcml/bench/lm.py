"""The transformer LM through hpcml against the same LM in a hand-written DDP loop, in tokens/s.

Both sides train `TinyGPT` (hpcml/workloads/gpt.py) on `PythonSourceBytes` windows read by a DataLoader with
the same workers and the same rank slices of the global batch, with the same gradient accumulation (DDP's
`no_sync` for every micro-batch but the last), clipping and AdamW, on the same ranks. hpcml's side is the
loop's whole step (batches, task step, accumulation, DDP, clipping, optimizer, step-boundary agreement);
the hand-written side is what a user writes without a framework. Rounds alternate the two. Beside the
ratio: the model FLOPs utilisation of hpcml's side against this machine's measured matmul rate.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from hpcml.bench import training
from hpcml.bench.record import BenchResult, Figure
from hpcml.compute.loader import RankBatchSampler
from hpcml.compute.preempt import PreemptionGuard
from hpcml.compute.runtime import stop_coordinator
from hpcml.compute.trainer import Trainer
from hpcml.compute.transport import iterations_for, mean_time
from hpcml.config import LoaderConfig, TrainConfig, TrainJobConfig
from hpcml.workloads.gpt import TinyGPT

TARGET = 0.95  # hpcml's tokens/s within 5% of the hand-written loop's
ENDLESS = 10**9


@dataclass(frozen=True)
class Variant:
    name: str
    block_size: int
    d_model: int
    n_layer: int
    per_rank_batch: int
    grad_accum_steps: int
    workers: int


def model_args(v: Variant) -> dict:
    return {"block_size": v.block_size, "d_model": v.d_model, "n_layer": v.n_layer, "n_head": 4}


def make_trainer(v: Variant, ctx, workdir: Path) -> Trainer:
    cfg = TrainJobConfig(
        model={"_target_": "hpcml.workloads.gpt.TinyGPT", **model_args(v)},
        data={
            "train": {
                "_target_": "hpcml.workloads.text.PythonSourceBytes",
                "block_size": v.block_size,
                "max_bytes": 1_000_000,
            },
            "eval": None,
        },
        task={"_target_": "hpcml.workloads.language_model.LanguageModeling"},
        optim={"_target_": "torch.optim.AdamW", "lr": 0.001, "weight_decay": 0.1},
        loader=LoaderConfig(num_workers=v.workers),
        train=TrainConfig(
            steps=ENDLESS,
            global_batch_size=v.per_rank_batch * ctx.world_size,
            grad_accum_steps=v.grad_accum_steps,
            clip_grad_norm=1.0,
            transport="torch",
            output_dir=str(workdir),
        ),
    )
    trainer = Trainer(cfg, ctx, stop_coordinator(cfg, ctx, PreemptionGuard([])))
    trainer.settle()
    return trainer


class HandWrittenLoop:
    """The same model, data, DataLoader settings, accumulation, clipping and optimizer, with no framework."""

    def __init__(self, trainer: Trainer, v: Variant):
        ctx = trainer.ctx
        torch.manual_seed(0)
        model = TinyGPT(**model_args(v))
        self.model = DistributedDataParallel(model) if ctx.world_size > 1 else model
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=0.001, weight_decay=0.1)
        self.accumulate = v.grad_accum_steps
        sampler = RankBatchSampler(trainer.stream, ctx.rank, ctx.world_size, 0, ENDLESS, v.grad_accum_steps)
        indices = ([i for _, i in keys] for keys in sampler)  # plain indices: a user's own sampler
        self.batches = iter(DataLoader(trainer.train_data, batch_sampler=indices, num_workers=v.workers))

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        for i in range(self.accumulate):
            x, y = next(self.batches)
            last = i == self.accumulate - 1
            sync = contextlib.nullcontext() if last or not hasattr(self.model, "no_sync") else self.model.no_sync()
            with sync:
                logits = self.model(x)
                (F.cross_entropy(logits.flatten(0, 1), y.flatten()) / self.accumulate).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()


def matmul_flops_per_s(size: int = 512, seconds: float = 0.3) -> float:
    """This process's dense float32 matmul rate: the peak an MFU figure on this machine is measured against."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        a @ b
        done += 1
    return done * 2 * size**3 / (time.perf_counter() - started)


def measure(v: Variant, ctx, budget_s: float, rounds: int, workdir: Path) -> dict:
    trainer = make_trainer(v, ctx, workdir)
    hand = HandWrittenLoop(trainer, v)
    paths = {"hpcml": training.loop_step(trainer), "hand_written": hand.step}
    iters = iterations_for(paths["hpcml"], budget_s)
    rounds_s: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(rounds):
        for name, step in paths.items():
            step()  # warm-up outside the timing
            rounds_s[name].append(mean_time(step, iters, warmup=0))
    return {
        **asdict(v),
        "ranks": ctx.world_size,
        "rounds_s": rounds_s,
        "step_s": {name: statistics.median(s) for name, s in rounds_s.items()},
        "flops_per_token": trainer.model.flops_per_token(),
        "matmul_flops_per_s": matmul_flops_per_s(),
    }


def measure_all(variants: list[Variant], ctx, budget_s: float, rounds: int, workdir: Path) -> list[dict]:
    return [measure(v, ctx, budget_s, rounds, workdir) for v in variants]


def figures_for(rows: list[dict]) -> list[Figure]:
    figures = []
    for r in rows:
        tokens = r["per_rank_batch"] * r["ranks"] * r["block_size"]
        hpcml = [tokens / s for s in r["rounds_s"]["hpcml"]]
        label = (
            f"{r['name']}: {r['ranks']} ranks, {r['workers']} loader workers, {r['grad_accum_steps']} micro-batches "
            f"of {r['per_rank_batch'] // r['grad_accum_steps']} x {r['block_size']} bytes/rank, tokens/s"
        )
        hand = [tokens / s for s in r["rounds_s"]["hand_written"]]
        figure = Figure.from_rounds("lm", label, "tokens/s", hpcml, "hand-written DDP loop, same settings", hand,
                                    higher_is_better=True, target=TARGET)  # fmt: skip
        figures.append(figure)
        # Model FLOPs utilisation: the model's training FLOPs per second over every rank's matmul peak.
        mfu = [t * r["flops_per_token"] / (r["ranks"] * r["matmul_flops_per_s"]) for t in hpcml]
        figures.append(
            Figure.from_rounds("lm", f"{r['name']}: model FLOPs utilisation (hpcml's side)", "share", mfu,
                               "each rank's float32 matmul peak", [1.0] * len(mfu), higher_is_better=True)
        )  # fmt: skip
    return figures


VARIANTS = [
    Variant("byte LM, 2 layers x 128 wide", block_size=64, d_model=128, n_layer=2, per_rank_batch=32,
            grad_accum_steps=2, workers=1),
]  # fmt: skip


def run(quick: bool, workdir: Path) -> BenchResult:
    budget_s, rounds = (0.5, 2) if quick else (2.0, 5)
    result = BenchResult("lm", quick, {"budget_s": budget_s, "rounds": rounds, "cpu_cores": os.cpu_count()})
    result.measurements.extend(training.measure_on_ranks(__name__, 2, VARIANTS, budget_s, rounds, workdir))
    result.figures = figures_for(result.measurements)
    result.notes.append(
        "MFU here is against this CPU's float32 matmul rate, measured in the same run; on a GPU the gpu benchmark "
        "reports the LM in bf16 against the device."
    )
    return result


if __name__ == "__main__":
    training.variants_worker(Variant, measure_all, __doc__.splitlines()[0])
