"""Gradient synchronisation across ranks: DistributedDataParallel, or one flat all-reduce after backward (or
FSDP's reduce-scatter of sharded gradients, in fsdp.py).

Both sum gradients over ranks after backward, so every rank applies the same update. The flat path keeps
all gradients as views into one contiguous buffer, so its all-reduce needs no packing copy. Either path's
all-reduces go over torch.distributed or MPI, as `train.transport` says (hpcml.compute.transport).

Where hpcml sums gradients itself (the flat path, and DDP with its own comm hook), the 1/N of the average
is folded into the loss before backward: scaling one scalar is free, while dividing the summed gradients
is a full pass over them (for a power-of-two N the result is bitwise the same).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from hpcml.compute import mpi, transport
from hpcml.compute.dist import DistributedContext
from hpcml.compute.fsdp import FSDPGradientSync
from hpcml.compute.transport import TransportSelector
from hpcml.config import TrainConfig
from hpcml.errors import ConfigError

# DDP puts the first gradients into a bucket of its own of about this size (torch's default).
DDP_FIRST_BUCKET_BYTES = 1 << 20
# The flat path probes at most this much: beyond it both transports are bandwidth-bound and the choice
# holds, while probing a multi-GB buffer would cost seconds and as much memory again.
FLAT_PROBE_MAX_BYTES = 64 << 20
# Its one size affords more rounds than DDP's ladder of sizes, and one probe decides every step's all-reduce.
FLAT_PROBE_ROUNDS = 5


class GradientSync(Protocol):
    """What the trainer asks of a gradient sync, whichever kind `make_gradient_sync` chose."""

    # What the trainer runs forward through (DDP's wrapper, or the bare model).
    module: nn.Module

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of `loss`, scaled where the sync sums rather than averages."""

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None: ...

    def synchronize(self) -> None:
        """After backward: every rank holds the same averaged gradients when this returns."""

    def no_sync(self) -> contextlib.AbstractContextManager:
        """Backward inside it only accumulates gradients locally (every micro-batch but a step's last)."""

    def settle(self, loss_of: Callable[[nn.Module], torch.Tensor]) -> None:
        """Once before the first step (a fresh run or a resume): lay out buffers and choose transports."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict | None) -> None: ...


def resolve_transport(requested: str, ctx: DistributedContext, grad_sync: str) -> str:
    """torch, mpi or auto (probe both); auto means torch wherever MPI cannot or need not compete."""
    if requested == transport.MPI:
        if not ctx.uses_mpi:
            raise ConfigError(
                f"train.transport=mpi needs an MPI launcher (mpirun, or srun --mpi=pmix); this job was started "
                f"by {ctx.launcher}. Use train.transport=auto or torch."
            )
        if ctx.device.type != "cpu" and grad_sync == "ddp":
            raise ConfigError(
                "train.transport=mpi with train.grad_sync=ddp reduces each bucket in host memory, and this job's "
                "gradients are on GPUs, where NCCL is the fast path; use train.transport=auto or torch (or "
                "train.grad_sync=flat, which stages its one buffer through pinned host memory for MPI)."
            )
    if requested == transport.AUTO and (ctx.world_size == 1 or not ctx.uses_mpi or ctx.device.type != "cpu"):
        return transport.TORCH
    return requested


# No annotations: DDP compares them with its own types, and this module's are strings (PEP 563).
def _reduce_bucket(sync_ref, bucket):
    """DDP's comm hook: `sync_ref` is a weak reference to the DDPGradientSync that registered it."""
    return sync_ref().reduce_bucket(bucket.index(), bucket.buffer())


class DDPGradientSync:
    """torch's DDP: bucketed all-reduces overlap with backward; each bucket on the faster transport."""

    def __init__(self, model: nn.Module, ctx: DistributedContext, cfg: TrainConfig):
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        self.module = DistributedDataParallel(
            model,
            device_ids=device_ids,
            bucket_cap_mb=cfg.ddp_bucket_cap_mb,
            gradient_as_bucket_view=cfg.gradient_as_bucket_view,
        )
        self.selector = TransportSelector(resolve_transport(cfg.transport, ctx, "ddp"), ctx.world_size)
        # Per bucket index, for MPI: (buffer address, its numpy view, a completed future holding it). DDP's
        # buckets keep their memory from step to step, and building these each time is most of the hook's
        # Python cost, which ranks sharing cores pay several times over.
        self._mpi_buckets: dict[int, tuple[int, np.ndarray, torch.futures.Future]] = {}
        self.loss_scale = 1.0
        grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        self.largest_bucket_bytes = min(grad_bytes, max(int(cfg.ddp_bucket_cap_mb * (1 << 20)), DDP_FIRST_BUCKET_BYTES))
        if self.selector.requested != transport.TORCH:
            # Our hook sums; DDP's built-in path (kept for transport=torch) divides each bucket instead.
            self.loss_scale = 1.0 / ctx.world_size
            # A weak reference: the reducer keeps its hook in C++, where the cycle collector cannot see it, so
            # a bound method would keep this object, DDP and its process group alive until interpreter exit,
            # when gloo's worker threads die taking the GIL ("terminate called without an active exception").
            self.module.register_comm_hook(weakref.ref(self), _reduce_bucket)

    def reduce_bucket(self, index: int, buffer: torch.Tensor) -> torch.futures.Future:
        """Sum bucket `index` over ranks in place, on the transport the plan gives its size."""
        chosen = self.selector.for_bytes(buffer.numel() * buffer.element_size())
        if chosen != transport.MPI:
            return transport.allreduce_sum_(buffer, chosen)
        cached = self._mpi_buckets.get(index)
        if cached is None or cached[0] != buffer.data_ptr():
            done: torch.futures.Future = torch.futures.Future()
            done.set_result(buffer)
            cached = self._mpi_buckets[index] = (buffer.data_ptr(), buffer.numpy(), done)
        mpi.world().allreduce_sum_(cached[1])
        return cached[2]  # MPI has finished: the same completed future serves every step

    def backward(self, loss: torch.Tensor) -> None:
        (loss * self.loss_scale if self.loss_scale != 1.0 else loss).backward()

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)

    def synchronize(self) -> None:
        """Nothing to do: DDP's hooks reduced every bucket during backward."""

    def no_sync(self) -> contextlib.AbstractContextManager:
        return self.module.no_sync()

    def state_dict(self) -> dict:
        return self.selector.state_dict()

    def load_state_dict(self, state: dict | None) -> None:
        self.selector.load_state_dict(state)

    def settle(self, loss_of: Callable[[nn.Module], torch.Tensor]) -> None:
        """One throwaway backward before the first real step, then the transport probe (auto).

        DDP lays its gradient buckets out anew after its first backward, in the order gradients became
        ready. The layout decides how gloo/NCCL chunk the buffer and so the order of float additions:
        without this, the first step after a resume would use a different layout than the uninterrupted
        run did, and resume would be close but not bitwise exact. Buffers (e.g. BatchNorm statistics)
        are restored so the throwaway pass changes nothing; gradients are cleared by the next zero_grad.
        """
        inner = self.module.module
        buffers = {name: b.detach().clone() for name, b in inner.named_buffers()}
        self.backward(loss_of(self.module))
        with torch.no_grad():
            for name, b in inner.named_buffers():
                b.copy_(buffers[name])
        self._mpi_buckets.clear()  # the next forward lays the buckets out anew; keep no old buffer alive
        self.selector.decide(transport.probe_sizes(self.largest_bucket_bytes))


class FlatGradientSync:
    """All gradients live in one flat buffer that a single all-reduce sums after backward."""

    def __init__(self, model: nn.Module, ctx: DistributedContext, cfg: TrainConfig):
        self.module = model
        self.selector = TransportSelector(resolve_transport(cfg.transport, ctx, "flat"), ctx.world_size)
        self.loss_scale = 1.0 / ctx.world_size
        params = [p for p in model.parameters() if p.requires_grad]
        total = sum(p.numel() for p in params)
        self.flat_grad = torch.zeros(total, dtype=params[0].dtype, device=params[0].device)
        self.nbytes = total * self.flat_grad.element_size()
        # MPI without CUDA support reads host memory: GPU gradients are staged through a pinned copy.
        self.host = self.flat_grad
        if ctx.device.type != "cpu" and self.selector.requested == transport.MPI:
            self.host = torch.zeros(total, dtype=self.flat_grad.dtype).pin_memory()
        offset = 0
        for p in params:
            p.grad = self.flat_grad[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        self._broadcast_parameters(params)

    @staticmethod
    def _broadcast_parameters(params: list[nn.Parameter]) -> None:
        """Start every rank from rank 0's weights, as DDP does."""
        with torch.no_grad():
            flat = torch.cat([p.detach().reshape(-1) for p in params])
            dist.broadcast(flat, src=0)
            offset = 0
            for p in params:
                p.copy_(flat[offset : offset + p.numel()].view_as(p))
                offset += p.numel()

    def backward(self, loss: torch.Tensor) -> None:
        (loss * self.loss_scale if self.loss_scale != 1.0 else loss).backward()

    def state_dict(self) -> dict:
        return self.selector.state_dict()

    def load_state_dict(self, state: dict | None) -> None:
        self.selector.load_state_dict(state)

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        # The gradients must stay views into the flat buffer, so they are zeroed, never set to None.
        self.flat_grad.zero_()

    def settle(self, loss_of: Callable[[nn.Module], torch.Tensor]) -> None:
        """The transport probe (auto), at the buffer's size: its layout never changes."""
        self.selector.decide([min(self.nbytes, FLAT_PROBE_MAX_BYTES)], rounds=FLAT_PROBE_ROUNDS)

    def no_sync(self) -> contextlib.AbstractContextManager:
        """Backward only ever accumulates into the flat buffer; synchronize() is what reduces it."""
        return contextlib.nullcontext()

    def synchronize(self) -> None:
        if self.selector.for_bytes(self.nbytes) == transport.TORCH:
            dist.all_reduce(self.flat_grad)
            return
        if self.host is not self.flat_grad:
            self.host.copy_(self.flat_grad)
        mpi.world().allreduce_sum_(self.host.numpy())
        if self.host is not self.flat_grad:
            self.flat_grad.copy_(self.host, non_blocking=False)


class NoGradientSync:
    """One rank alone: nothing to average. DDP would still run its reducer, bucket copies and a one-rank
    all-reduce every step, a large share of a small model's step, for bitwise the same gradients."""

    def __init__(self, model: nn.Module):
        self.module = model

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)

    def synchronize(self) -> None:
        """Nothing to do."""

    def no_sync(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def settle(self, loss_of: Callable[[nn.Module], torch.Tensor]) -> None:
        """Nothing to settle: no buckets."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict | None) -> None:
        """Nothing to restore (a plan from a multi-rank run has no use here, and stays in that checkpoint)."""


def make_gradient_sync(model: nn.Module, ctx: DistributedContext, cfg: TrainConfig) -> GradientSync:
    if cfg.grad_sync == "fsdp":  # sharded even on one rank: its checkpoints are sharded like any FSDP run's
        return FSDPGradientSync(model, ctx, cfg)
    if cfg.grad_sync == "flat":
        return FlatGradientSync(model, ctx, cfg)
    if ctx.world_size == 1:
        return NoGradientSync(model)
    return DDPGradientSync(model, ctx, cfg)
