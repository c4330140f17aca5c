"""Gradient synchronisation across ranks: DistributedDataParallel, or one flat MPI all-reduce.

Both average gradients over ranks after backward, so every rank applies the same update. The MPI path
keeps all gradients as views into one contiguous buffer, so the all-reduce needs no packing copy.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from hpcml import mpi
from hpcml.config import TrainConfig
from hpcml.dist import DistributedContext
from hpcml.errors import ConfigError


class DDPGradientSync:
    """torch's DDP: bucketed all-reduces overlap with backward."""

    def __init__(self, model: nn.Module, ctx: DistributedContext, cfg: TrainConfig):
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        self.module = DistributedDataParallel(
            model,
            device_ids=device_ids,
            bucket_cap_mb=cfg.ddp_bucket_cap_mb,
            gradient_as_bucket_view=cfg.gradient_as_bucket_view,
        )

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)

    def synchronize(self) -> None:
        """Nothing to do: DDP's hooks reduced every bucket during backward."""

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
        loss_of(self.module).backward()
        with torch.no_grad():
            for name, b in inner.named_buffers():
                b.copy_(buffers[name])


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
        self.flat_grad.div_(self.world.size)


def make_gradient_sync(model: nn.Module, ctx: DistributedContext, cfg: TrainConfig):
    if cfg.grad_sync == "mpi":
        return MPIGradientSync(model, ctx)
    return DDPGradientSync(model, ctx, cfg)
