"""A user's model and Dataset through hpcml's seam, against the same model in a hand-written DDP loop.

Both sides train the same network (defined here, built by hpcml from a `_target_`) on the same map-style
Dataset (not in-memory tensors: each sample is built and augmented in `__getitem__`), read by a DataLoader
with the same workers and the same rank slices of the global batch, on the same ranks. hpcml's side is
the loop's whole step (batch, task step, DDP, optimizer, step-boundary agreement); the hand-written side
is what a user writes without a framework. Rounds alternate the two. The loader's share of each side's
step is reported as the step against the same step minus its time waiting for batches.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from hpcml.bench import training
from hpcml.bench.record import BenchResult, Figure
from hpcml.compute.loader import RankBatchSampler
from hpcml.compute.preempt import PreemptionGuard
from hpcml.compute.runtime import stop_coordinator
from hpcml.compute.trainer import Trainer
from hpcml.compute.transport import iterations_for, mean_time
from hpcml.config import LoaderConfig, TrainConfig, TrainJobConfig

TARGET = 0.95  # hpcml's step within 5% of the hand-written one; the loader under 5% of the step
ENDLESS = 10**9


class NoisyFeatures(Dataset):
    """Each sample built from its index in __getitem__, with random augmentation, as user datasets are."""

    def __init__(self, size: int = 8192, features: int = 256, classes: int = 10):
        generator = torch.Generator().manual_seed(0)
        self.table = torch.randn(size, features, generator=generator)
        self.labels = torch.randint(0, classes, (size,), generator=generator)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.table[i] + 0.1 * torch.randn(self.table.shape[1]), self.labels[i]


class UserNet(nn.Module):
    def __init__(self, features: int = 256, hidden: int = 512, classes: int = 10):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.head(self.net(x))


@dataclass(frozen=True)
class Variant:
    name: str
    per_rank_batch: int
    workers: int


def make_trainer(v: Variant, ctx, workdir: Path) -> Trainer:
    cfg = TrainJobConfig(
        model={"_target_": f"{__name__}.UserNet"},
        data={"train": {"_target_": f"{__name__}.NoisyFeatures"}, "eval": None},
        optim={"_target_": "torch.optim.SGD", "lr": 0.01, "momentum": 0.9},
        loader=LoaderConfig(num_workers=v.workers),
        train=TrainConfig(
            steps=ENDLESS,
            global_batch_size=v.per_rank_batch * ctx.world_size,
            transport="torch",
            output_dir=str(workdir),
        ),
    )
    trainer = Trainer(cfg, ctx, stop_coordinator(cfg, ctx, PreemptionGuard([])))
    trainer.settle()
    return trainer


class HandWrittenLoop:
    """The same model, optimizer, Dataset and DataLoader settings, with no framework."""

    def __init__(self, trainer: Trainer, v: Variant):
        ctx = trainer.ctx
        torch.manual_seed(0)
        self.model = DistributedDataParallel(UserNet()) if ctx.world_size > 1 else UserNet()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        sampler = RankBatchSampler(trainer.stream, ctx.rank, ctx.world_size, 0, ENDLESS)
        indices = ([i for _, i in keys] for keys in sampler)  # plain indices: a user's own sampler
        loader = DataLoader(trainer.train_data, batch_sampler=indices, num_workers=v.workers)
        self.batches = iter(loader)
        self.wait_s = 0.0  # time spent waiting for batches, as hpcml's loop counts its own

    def take_wait_s(self) -> float:
        waited, self.wait_s = self.wait_s, 0.0
        return waited

    def step(self) -> None:
        started = time.perf_counter()
        x, y = next(self.batches)
        self.wait_s += time.perf_counter() - started
        self.optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(self.model(x), y).backward()
        self.optimizer.step()


def measure(v: Variant, ctx, budget_s: float, rounds: int, workdir: Path) -> dict:
    trainer = make_trainer(v, ctx, workdir)
    hand = HandWrittenLoop(trainer, v)
    paths = {"hpcml": training.loop_step(trainer), "hand_written": hand.step}
    iters = iterations_for(paths["hpcml"], budget_s)
    waited = {"hpcml": trainer.batches.take_wait_s, "hand_written": hand.take_wait_s}
    rounds_s: dict[str, list[float]] = {name: [] for name in paths}
    waits: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(rounds):
        for name, step in paths.items():
            step()  # warm-up outside the timing, and the wait counter starts clean after it
            waited[name]()
            rounds_s[name].append(mean_time(step, iters, warmup=0))
            waits[name].append(waited[name]() / iters)
    return {
        **asdict(v),
        "ranks": ctx.world_size,
        "rounds_s": rounds_s,
        "loader_wait_s": waits,
        "step_s": {name: statistics.median(s) for name, s in rounds_s.items()},
    }


def measure_all(variants: list[Variant], ctx, budget_s: float, rounds: int, workdir: Path) -> list[dict]:
    return [measure(v, ctx, budget_s, rounds, workdir) for v in variants]


def figures_for(rows: list[dict]) -> list[Figure]:
    figures = []
    for r in rows:
        batch = r["per_rank_batch"] * r["ranks"]
        hpcml = [batch / s for s in r["rounds_s"]["hpcml"]]
        label = f"{r['name']}: {r['ranks']} ranks, {r['workers']} loader workers, batch {r['per_rank_batch']}/rank"
        figures.append(
            Figure.from_rounds(
                "seam",
                f"{label}, samples/s",
                "samples/s",
                hpcml,
                "hand-written DDP loop, same DataLoader settings",
                [batch / s for s in r["rounds_s"]["hand_written"]],
                higher_is_better=True,
                target=TARGET,
            )
        )
        for side, target in (("hpcml", TARGET), ("hand_written", None)):
            steps, waits = r["rounds_s"][side], r["loader_wait_s"][side]
            whose = "" if side == "hpcml" else ", the hand-written loop's (for scale: the same loader, no target)"
            figures.append(
                Figure.from_rounds(
                    "seam",
                    f"{label}, loader wait (step against the step minus its wait for batches){whose}",
                    "samples/s",
                    [batch / s for s in steps],
                    "no wait for batches",
                    [batch / (s - w) for s, w in zip(steps, waits, strict=True)],
                    higher_is_better=True,
                    target=target,
                )
            )
    return figures


VARIANTS = [Variant("user MLP on an augmenting Dataset", per_rank_batch=256, workers=2)]


def run(quick: bool, workdir: Path) -> BenchResult:
    budget_s, rounds = (0.3, 2) if quick else (1.0, 5)
    result = BenchResult("seam", quick, {"budget_s": budget_s, "rounds": rounds, "cpu_cores": os.cpu_count()})
    result.measurements.extend(training.measure_on_ranks(__name__, 2, VARIANTS, budget_s, rounds, workdir))
    result.figures = figures_for(result.measurements)
    result.notes.append(
        "both sides' DataLoader workers share this machine's cores with the ranks: on a node with cores to "
        "spare for workers the loader's share of a step is smaller. The hand-written loop's own wait, measured "
        "the same way, shows how much of hpcml's is the machine's."
    )
    return result


if __name__ == "__main__":
    training.variants_worker(Variant, measure_all, __doc__.splitlines()[0])
