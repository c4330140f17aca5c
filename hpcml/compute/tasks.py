"""The task seam: what one training step computes and how a run is evaluated.

A task is any object with these two methods (a `_target_` in the config, `task=...`):

    training_step(model, batch) -> loss                  # a scalar tensor, or (loss, {name: scalar tensor})
    evaluate(model, batches) -> {name: float}            # on the eval dataset, model in eval mode, no grad

`batch` is what the train dataset's samples collate to ((x, y) for a TensorDataset: a tuple when indexed
directly, a list through torch's default_collate), already on the rank's device; `model` is the
data-parallel wrapper (call it, do not reach inside). The metrics a step returns (the same names on every
rank and step) are averaged over ranks and logged with the loss; the dict `evaluate` returns goes into
`metrics.jsonl` and `result.json`, where `launch.objective` and `hpcml report --metric` read it. A task
with state of its own (a running statistic, a curriculum) also defines `state_dict()` and
`load_state_dict(state)`, and it is checkpointed with the model. Classification is the default.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

Metrics = Mapping[str, torch.Tensor]


@runtime_checkable
class Task(Protocol):
    def training_step(self, model: nn.Module, batch: Any) -> torch.Tensor | tuple[torch.Tensor, Metrics]: ...

    def evaluate(self, model: nn.Module, batches: Iterable[Any]) -> dict[str, float]: ...


class Classification:
    """Logits against integer labels: batches are (inputs, labels). Evaluation gives `test_accuracy` and
    `test_loss` over the whole eval dataset."""

    def __init__(self, loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None):
        # Any callable (logits, labels) -> mean loss: +task.loss._target_=torch.nn.CrossEntropyLoss
        # +task.loss.label_smoothing=0.1, or the user's own.
        self.loss = loss if loss is not None else nn.CrossEntropyLoss()

    def training_step(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        inputs, labels = batch
        return self.loss(model(inputs), labels)

    def evaluate(self, model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
        correct = seen = 0
        loss_sum = 0.0
        for inputs, labels in batches:
            logits = model(inputs)
            correct += int((logits.argmax(dim=1) == labels).sum())
            loss_sum += float(self.loss(logits, labels)) * len(labels)  # the loss is a mean over the batch
            seen += len(labels)
        if not seen:
            raise ValueError("the eval dataset is empty: give data.eval a dataset with samples, or set data.eval=null.")
        return {"test_accuracy": correct / seen, "test_loss": loss_sum / seen}


def split_step_output(output: Any, where: str) -> tuple[torch.Tensor, Metrics]:
    """A task's training_step result as (loss, metrics), refusing anything else with a clear message."""
    loss, metrics = output if isinstance(output, tuple) and len(output) == 2 else (output, {})
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise TypeError(
            f"{where} must return the loss as a scalar tensor, or (loss, {{name: scalar tensor}}); got {type(output).__name__}."
        )
    if not isinstance(metrics, Mapping):
        raise TypeError(
            f"{where} returned (loss, {type(metrics).__name__}); the second item must be a dict of metrics."
        )
    return loss, metrics
