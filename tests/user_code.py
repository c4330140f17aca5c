"""A user's own model, dataset and task, defined outside hpcml: what the tests train through the seam.

Importable by the ranks because tests/helpers.py puts this folder on PYTHONPATH, as a user's project
directory would be.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset


class Waves(Dataset):
    """Samples are dicts (not (x, y) tuples), built in __getitem__ from the index; `noise` adds random
    augmentation. With `poison` set, that sample's input is NaN (a corrupt record); with `unreadable` set,
    reading that sample raises."""

    def __init__(
        self,
        size: int = 512,
        features: int = 6,
        noise: float = 0.0,
        poison: int | None = None,
        unreadable: int | None = None,
    ):
        self.size, self.features, self.noise, self.poison, self.unreadable = size, features, noise, poison, unreadable

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if i == self.unreadable:
            raise OSError(f"sample {i}: input/output error")
        phase = torch.arange(self.features, dtype=torch.float32) * 0.7 + i * 0.13
        x = torch.sin(phase) + 0.1 * math.cos(i)
        if self.noise:
            # Augmentation drawn here, from the process's random streams (torch's and numpy's), as user code does.
            x = x + self.noise * torch.randn_like(x) + float(np.random.uniform(-self.noise, self.noise))
        if i == self.poison:
            x = torch.full_like(x, float("nan"))
        return {"signal": x, "target": torch.tensor([x.sum().item() * 0.5, float(i % 3)])}


class TwoHeads(nn.Module):
    def __init__(self, features: int = 6, hidden: int = 16, dropout: float = 0.0, batchnorm: bool = False):
        super().__init__()
        norm = [nn.BatchNorm1d(hidden)] if batchnorm else []
        self.body = nn.Sequential(nn.Linear(features, hidden), *norm, nn.Tanh(), nn.Dropout(dropout))
        self.heads = nn.ModuleList([nn.Linear(hidden, 1), nn.Linear(hidden, 1)])

    def forward(self, signal: torch.Tensor) -> torch.Tensor:
        h = self.body(signal)
        return torch.cat([head(h) for head in self.heads], dim=1)


class DeclaredUnits(TwoHeads):
    """TwoHeads that names its own FSDP units: its body alone, or (`stray`) a module that is not part of it."""

    def __init__(self, stray: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.stray = stray

    def fsdp_units(self) -> list[nn.Module]:
        return [nn.Linear(1, 1)] if self.stray else [self.body]


class Regression:
    """Mean squared error, a step metric (mean absolute error) and evaluation metrics of its own; it counts
    the samples it trained on, as state that must survive a resume."""

    def __init__(self, weight: float = 1.0, metric_per_rank: bool = False, evaluate_fails: bool = False):
        self.weight = weight
        self.samples_seen = 0
        # Faults a user's task can have: a metric named after the rank, an evaluation that raises.
        self.metric_per_rank, self.evaluate_fails = metric_per_rank, evaluate_fails

    def training_step(self, model, batch):
        prediction = model(batch["signal"])
        self.samples_seen += len(prediction)
        error = prediction - batch["target"]
        metrics = {"mae": error.abs().mean()}
        if self.metric_per_rank:
            metrics[f"mae_rank{torch.distributed.get_rank()}"] = metrics["mae"]
        return self.weight * (error**2).mean(), metrics

    def evaluate(self, model, batches) -> dict[str, float]:
        if self.evaluate_fails:
            raise RuntimeError("evaluation crashed")
        total = count = 0.0
        for batch in batches:
            total += float(((model(batch["signal"]) - batch["target"]) ** 2).sum())
            count += batch["target"].numel()
        return {"val_mse": total / count}

    def state_dict(self) -> dict:
        return {"samples_seen": self.samples_seen}

    def load_state_dict(self, state: dict) -> None:
        self.samples_seen = state["samples_seen"]


# Its configs are in tests/user_conf/, added to hpcml's by Hydra's search path (an override, so it may go
# anywhere on the command line; `--config-dir tests/user_conf` before the overrides does the same).
USE = [
    f"hydra.searchpath=[file://{Path(__file__).resolve().parent / 'user_conf'}]",
    "model=two_heads",
    "data=waves",
    "task=regression",
]
