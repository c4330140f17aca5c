"""A run's parts, built from its config on every rank: the task, the datasets, the model, the optimizer and
the LR schedule. Each is a `_target_` node (hpcml/components.py); this module builds them in a fixed order,
after seeding every random stream alike, and checks that each built object is what the loop needs. The
loop (trainer.py) takes the parts and chooses none of them."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from hpcml import components
from hpcml.compute.data import check_map_style, on_device
from hpcml.compute.tasks import Task
from hpcml.config import TrainJobConfig
from hpcml.errors import ConfigError


@dataclass
class RunParts:
    task: Task
    train_data: Any
    eval_data: Any | None
    collate: Callable[[list[Any]], Any] | None
    model: torch.nn.Module


def build_parts(cfg: TrainJobConfig, device: torch.device) -> RunParts:
    """Task, datasets, collate function and model, the same on every rank and in every submission."""
    # Every random stream seeded alike before any user code runs: a Dataset or task that draws from numpy or
    # `random` while it is built must not differ between ranks or submissions.
    random.seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    task = build_task(cfg)
    train_data, eval_data = build_datasets(cfg, device)
    collate = components.build("loader.collate_fn", cfg.loader.collate_fn) if cfg.loader.collate_fn else None
    return RunParts(task, train_data, eval_data, collate, build_model(cfg, device))


def build_model(cfg: TrainJobConfig, device: torch.device) -> torch.nn.Module:
    # Same seed on every rank: identical initial weights even before DDP's broadcast.
    torch.manual_seed(cfg.train.seed)
    model = components.build("model", cfg.model)
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(
            f"model._target_={cfg.model['_target_']} returned a {type(model).__name__}, not an nn.Module."
        )
    return model.to(device)


def build_optimizer(cfg: TrainJobConfig, params) -> torch.optim.Optimizer:
    optimizer = components.build("optim", cfg.optim, params)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(
            f"optim._target_={cfg.optim['_target_']} returned a {type(optimizer).__name__}, not a torch Optimizer."
        )
    return optimizer


def build_scheduler(cfg: TrainJobConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """The config's schedule, stepped once per training step; none: a constant learning rate."""
    if cfg.schedule is None:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return components.build("schedule", cfg.schedule, optimizer)


def build_task(cfg: TrainJobConfig) -> Task:
    task = components.build("task", cfg.task)
    if not isinstance(task, Task):
        raise ConfigError(
            f"task._target_={cfg.task['_target_']} built a {type(task).__name__}, which lacks training_step(model, batch) "
            "or evaluate(model, batches); see hpcml/compute/tasks.py."
        )
    return task


def build_datasets(cfg: TrainJobConfig, device: torch.device) -> tuple[Any, Any | None]:
    """The train and (optional) eval datasets. In-memory ones move to the GPU when they fit, unless
    DataLoader workers read them: a forked worker cannot touch CUDA tensors."""
    in_rank = cfg.loader.num_workers == 0 and cfg.loader.collate_fn is None
    train = components.build("data.train", cfg.data["train"])
    check_map_style(train, "data.train")
    evaluation = None
    if cfg.data.get("eval") is not None:
        evaluation = components.build("data.eval", cfg.data["eval"])
        check_map_style(evaluation, "data.eval")
        evaluation = on_device(evaluation, device)
    return (on_device(train, device) if in_rank else train), evaluation
