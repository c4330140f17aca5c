"""Gradient synchronisation across ranks: DistributedDataParallel, or one flat MPI all-reduce.

Both average gradients over ranks after backward, so every rank applies the same update. The MPI path
keeps all gradients as views into one contiguous buffer, so the all-reduce needs no packing copy.

Where hpcml sums gradients itself (the MPI path, and DDP with its own comm hook), the 1/N of the average
is folded into the loss before backward: scaling one scalar is free, while dividing the summed gradients
is a full pass over them (for a power-of-two N the result is bitwise the same).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from hpcml import mpi, transport
from hpcml.config import TrainConfig
from hpcml.dist import DistributedContext
from hpcml.errors import ConfigError
from hpcml.transport import TransportPlan

log = logging.getLogger(__name__)

# DDP puts the first gradients into a bucket of its own of about this size (torch's default).
DDP_FIRST_BUCKET_BYTES = 1 << 20


def resolve_ddp_transport(requested: str, ctx: DistributedContext) -> str:
    """torch, mpi or auto (probe both); auto means torch wherever MPI cannot or need not compete."""
    if requested == transport.MPI:
        if not ctx.uses_mpi:
            raise ConfigError(
                f"train.ddp_transport=mpi needs an MPI launcher (mpirun, or srun --mpi=pmix); this job was started "
                f"by {ctx.launcher}. Use train.ddp_transport=auto or torch."
            )
        if ctx.device.type != "cpu":
            raise ConfigError(
                "train.ddp_transport=mpi reduces host memory, and this job's gradients are on GPUs, where NCCL is "
                "the fast path; use train.ddp_transport=auto or torch."
            )
    if requested == transport.AUTO and (ctx.world_size == 1 or not ctx.uses_mpi or ctx.device.type != "cpu"):
        return transport.TORCH
    return requested


# No annotations: DDP compares them with its own types, and this module's are strings (PEP 563).
def _reduce_bucket(sync_ref, bucket):
    """DDP's comm hook: `sync_ref` is a weak reference to the DDPGradientSync that registered it."""
    return sync_ref().reduce_bucket_buffer(bucket.buffer())


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
        self.world_size = ctx.world_size
        self.transport = resolve_ddp_transport(cfg.ddp_transport, ctx)
        self.plan: TransportPlan | None = None
        self._chosen: dict[int, str] = {}  # bucket numel -> transport, filled from the plan
        self.loss_scale = 1.0
        grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        self.largest_bucket_bytes = min(grad_bytes, max(int(cfg.ddp_bucket_cap_mb * (1 << 20)), DDP_FIRST_BUCKET_BYTES))
        if self.transport != transport.TORCH:
            # Our hook sums; DDP's built-in path (kept for transport=torch) divides each bucket instead.
            self.loss_scale = 1.0 / ctx.world_size
            # A weak reference: the reducer keeps its hook in C++, where the cycle collector cannot see it, so
            # a bound method would keep this object, DDP and its process group alive until interpreter exit,
            # when gloo's worker threads die taking the GIL ("terminate called without an active exception",
            # exit 134 after a finished run; seen in CI).
            self.module.register_comm_hook(weakref.ref(self), _reduce_bucket)
            if self.transport == transport.MPI:
                self.plan = TransportPlan.always(transport.MPI)

    def reduce_bucket_buffer(self, buffer: torch.Tensor) -> torch.futures.Future:
        """Sum one bucket over ranks in place, on the transport the plan gives its size."""
        if self.plan is None:  # settle()'s throwaway backward, before the probe: the process group
            return transport.allreduce_sum_(buffer, transport.TORCH)
        # Buckets keep their sizes from step to step: look each size up once (this runs per bucket per step).
        chosen = self._chosen.get(buffer.numel())
        if chosen is None:
            chosen = self._chosen[buffer.numel()] = self.plan.for_bytes(buffer.numel() * buffer.element_size())
        return transport.allreduce_sum_(buffer, chosen)

    def backward(self, loss: torch.Tensor) -> None:
        (loss * self.loss_scale if self.loss_scale != 1.0 else loss).backward()

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)

    def synchronize(self) -> None:
        """Nothing to do: DDP's hooks reduced every bucket during backward."""

    def state_dict(self) -> dict:
        plan = self.plan.as_state() if self.plan is not None and self.transport == transport.AUTO else None
        return {"transport_plan": plan, "world_size": self.world_size}

    def load_state_dict(self, state: dict | None) -> None:
        """Reuse a checkpoint's transport plan at the same world size, so the summation order is unchanged."""
        if (
            state
            and state.get("transport_plan")
            and state["world_size"] == self.world_size
            and self.transport == transport.AUTO
        ):
            self.plan = TransportPlan.from_state(state["transport_plan"])
            self._chosen.clear()
            log.info("all-reduce transports from the checkpoint: %s", self.plan.as_state())

    def settle(self, loss_of: Callable[[nn.Module], torch.Tensor]) -> None:
        """One throwaway backward before the first real step.

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
        if self.transport == transport.AUTO and self.plan is None:
            self.plan, timings = transport.probe(self.largest_bucket_bytes)
            log.info(
                "all-reduce transport by bucket size (bytes): %s (probe: %s)",
                self.plan.as_state(),
                ", ".join(f"{t['bytes']}B torch {t['torch'] * 1e3:.2f}ms mpi {t['mpi'] * 1e3:.2f}ms" for t in timings),
            )


class MPIGradientSync:
    """All gradients live in one flat buffer that a single MPI_Allreduce averages after backward."""

    def __init__(self, model: nn.Module, ctx: DistributedContext):
        if not ctx.uses_mpi:
            raise ConfigError(
                f"train.grad_sync=mpi needs an MPI launcher (mpirun, or srun --mpi=pmix); this job was started by "
                f"{ctx.launcher}. Use train.grad_sync=ddp."
            )
        self.module = model
        self.world = mpi.world()
        self.loss_scale = 1.0 / self.world.size
        params = [p for p in model.parameters() if p.requires_grad]
        total = sum(p.numel() for p in params)
        self.flat_grad = torch.zeros(total, dtype=params[0].dtype, device=params[0].device)
        # MPI without CUDA support reads host memory: GPU gradients are staged through a pinned copy.
        self.host = (
            self.flat_grad if ctx.device.type == "cpu" else torch.zeros(total, dtype=self.flat_grad.dtype).pin_memory()
        )
        offset = 0
        for p in params:
            p.grad = self.flat_grad[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        self._broadcast_parameters(params)

    def _broadcast_parameters(self, params: list[nn.Parameter]) -> None:
        """Start every rank from rank 0's weights, as DDP does."""
        with torch.no_grad():
            flat = torch.cat([p.detach().reshape(-1).cpu() for p in params])
            self.world.broadcast_array_(flat.numpy())
            offset = 0
            for p in params:
                p.copy_(flat[offset : offset + p.numel()].view_as(p))
                offset += p.numel()

    def backward(self, loss: torch.Tensor) -> None:
        (loss * self.loss_scale if self.loss_scale != 1.0 else loss).backward()

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict | None) -> None:
        """Nothing to restore: one flat MPI all-reduce, always."""

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        # The gradients must stay views into the flat buffer, so they are zeroed, never set to None.
        self.flat_grad.zero_()

    def settle(self, loss_of: Callable[[nn.Module], torch.Tensor]) -> None:
        """Nothing to settle: the flat buffer's layout never changes."""

    def synchronize(self) -> None:
        if self.host is not self.flat_grad:
            self.host.copy_(self.flat_grad)
        self.world.allreduce_sum_(self.host.numpy())
        if self.host is not self.flat_grad:
            self.flat_grad.copy_(self.host, non_blocking=False)


class NoGradientSync:
    """One rank alone: nothing to average. DDP would still run its reducer, bucket copies and a one-rank
    all-reduce every step (measured: a third of a small model's step), for bitwise the same gradients."""

    def __init__(self, model: nn.Module):
        self.module = model

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)

    def synchronize(self) -> None:
        """Nothing to do."""

    def settle(self, loss_of: Callable[[nn.Module], torch.Tensor]) -> None:
        """Nothing to settle: no buckets."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict | None) -> None:
        """Nothing to restore (a plan from a multi-rank run has no use here, and stays in that checkpoint)."""


def make_gradient_sync(model: nn.Module, ctx: DistributedContext, cfg: TrainConfig):
    if cfg.grad_sync == "mpi":
        return MPIGradientSync(model, ctx)
    if ctx.world_size == 1:
        return NoGradientSync(model)
    return DDPGradientSync(model, ctx, cfg)
