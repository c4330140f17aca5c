"""Mixed precision: the forward under autocast, and for fp16 a loss scaler whose state is checkpointed.

fp32 runs everything in float32. bf16 autocasts the forward to bfloat16 (its float32-sized exponent needs
no loss scaling). fp16 autocasts to float16 and scales the loss so that small gradients do not flush to
zero; the scaler skips a step whose gradients overflowed and adapts its scale, and that scale is part of
the run's state: a resume without it would scale the next steps differently from the uninterrupted run.
Parameters and optimizer state stay float32 throughout.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    def __init__(self, mode: str, device: torch.device):
        self.mode, self.device_type, self.dtype = mode, device.type, DTYPES[mode]
        self.scaler = torch.amp.GradScaler(device.type) if mode == "fp16" else None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """True gradients in place (before clipping them by their norm)."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimizer's step; with fp16, skipped when a gradient overflowed, and the scale updated."""
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self) -> dict[str, Any]:
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
