"""Fully sharded data parallelism (`train.grad_sync=fsdp`): torch's FSDP2 `fully_shard` splits each
parameter, its gradient and its optimizer state across the ranks, so each rank holds 1/N of them.

Every unit (a block of the model, then the model itself) all-gathers its parameters just before its forward
and backward and frees them after; gradients are reduce-scattered (averaged) in backward, so each rank steps
the optimizer on its own shard. Which blocks become units is the model's to say (`fsdp_units()`); otherwise
the blocks of its `nn.ModuleList`s, as transformers hold their layers, or else its direct children.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from hpcml.compute.dist import DistributedContext
from hpcml.config import TrainConfig
from hpcml.errors import ConfigError

log = logging.getLogger(__name__)


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The submodules that become FSDP units before the model itself, in the order they are given.

    A model may declare them with a method `fsdp_units()` returning submodules (what torchtitan's models do
    by hand); otherwise every block of every `nn.ModuleList` in the model; a model without one: each direct
    child that holds parameters. Fewer, larger units mean fewer collectives; smaller ones, a lower peak.
    """
    declared = getattr(model, "fsdp_units", None)
    if callable(declared):
        units = list(declared())
        own = {id(m) for m in model.modules()}
        stray = [type(u).__name__ for u in units if not isinstance(u, nn.Module) or id(u) not in own or u is model]
        if stray:
            raise ConfigError(
                f"{type(model).__name__}.fsdp_units() returned {', '.join(stray)}, which are not submodules of the "
                "model; return the blocks to shard one by one (e.g. `return list(self.layers)`)."
            )
        return units
    blocks = [block for m in model.modules() if isinstance(m, nn.ModuleList) for block in m]
    if blocks:
        return [b for b in blocks if _holds_parameters(b)]
    return [child for child in model.children() if _holds_parameters(child)]


def _holds_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def mixed_precision(cfg: TrainConfig, device: torch.device) -> MixedPrecisionPolicy:
    """bf16 on a GPU: the units gather and compute in bfloat16, and reduce gradients in float32 (a bf16 sum
    over many ranks loses the small gradients); the sharded master copy and optimizer stay float32. Elsewhere
    the parameters stay float32 and autocast alone lowers the precision (train.precision)."""
    if cfg.precision == "bf16" and device.type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


class FSDPGradientSync:
    """The model, sharded in place; backward reduce-scatters each unit's gradients as they are ready."""

    def __init__(self, model: nn.Module, ctx: DistributedContext, cfg: TrainConfig):
        if any(isinstance(m, FSDPModule) for m in model.modules()):
            raise ConfigError(
                f"{type(model).__name__} is already sharded (fully_shard was applied to it); with "
                "train.grad_sync=fsdp hpcml shards it: build the model unsharded."
            )
        mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
        policy = mixed_precision(cfg, ctx.device)
        units = shard_units(model)
        # Innermost first: fully_shard must reach a nested unit before the unit that holds it.
        depth = {id(m): name.count(".") for name, m in model.named_modules()}
        for unit in sorted(units, key=lambda u: -depth[id(u)]):
            fully_shard(unit, mesh=mesh, reshard_after_forward=cfg.fsdp_reshard_after_forward, mp_policy=policy)
        # The root gathers what no unit holds (embeddings, a final norm or head). It stays gathered from its
        # forward to its backward: its backward begins as soon as its forward ends, so freeing them in between
        # would only gather them again at once.
        fully_shard(model, mesh=mesh, reshard_after_forward=False, mp_policy=policy)
        log.info("FSDP: %d units and the root, over %d ranks", len(units), ctx.world_size)
        self.module = model
        # Buffers (BatchNorm's running statistics) are not sharded: each rank would keep its own. As under DDP,
        # every training forward starts from rank 0's, and rank 0's are the ones saved (sharded.py).
        self._buffers = list(model.buffers())
        if self._buffers and ctx.world_size > 1:
            model.register_forward_pre_hook(self._broadcast_buffers)

    def _broadcast_buffers(self, module: nn.Module, args: object) -> None:
        if module.training and torch.is_grad_enabled():
            for buffer in self._buffers:
                dist.broadcast(buffer, src=0)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)

    def synchronize(self) -> None:
        """Nothing to do: backward reduce-scattered every unit's gradients."""

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Gradients accumulate unsharded, unreduced, until the step's last micro-batch reduces their sum."""
        self.module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.module.set_requires_gradient_sync(True)

    def settle(self, loss_of: Callable[[nn.Module], torch.Tensor]) -> None:
        """Nothing to settle: the units' collectives are laid out when they are built, the same every run."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict | None) -> None:
        """Nothing to restore."""


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor that may be a DTensor (a sharded model's gradient norm), as a plain tensor."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def whole_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's whole state on CPU, keyed as `model.state_dict()` is: gathered to rank 0 from the shards
    of a sharded model (a collective then: every rank calls it; the others get {})."""
    if not is_sharded(model):
        return {name: t.detach().cpu() for name, t in model.state_dict().items()}
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
