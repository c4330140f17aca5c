"""Catching a loss that is NaN or infinite: a job-wide error naming the rank and step, before any save.

Checking every step would cost a device-to-host synchronisation per step on a GPU. Instead each rank
remembers, on its device, the first step whose loss was not finite, and the ranks compare these at every
logging step and before every save (both already synchronise). One rank's NaN reaches every replica through
the gradient average, so a save after it would write NaN weights over the last good checkpoint: `check`
runs first and fails the job instead.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from hpcml.compute.dist import DistributedContext
from hpcml.errors import NonFiniteLossError

NOT_SEEN = -1


class NonFiniteLossWatch:
    def __init__(self, ctx: DistributedContext):
        self.ctx = ctx
        self.first_bad_step = torch.full((), NOT_SEEN, dtype=torch.int64, device=ctx.device)

    def observe(self, loss: torch.Tensor, step: int) -> None:
        """Remember `step` if `loss` is not finite and no earlier step was (no synchronisation)."""
        unseen = self.first_bad_step == NOT_SEEN
        bad = ~torch.isfinite(loss.detach())
        self.first_bad_step = torch.where(unseen & bad, torch.full_like(self.first_bad_step, step), self.first_bad_step)

    def check(self, step: int) -> None:
        """A collective: every rank raises NonFiniteLossError if any rank has seen a non-finite loss."""
        seen = [self.first_bad_step]
        if self.ctx.world_size > 1:
            seen = [torch.empty_like(self.first_bad_step) for _ in range(self.ctx.world_size)]
            dist.all_gather(seen, self.first_bad_step)
        bad = {rank: int(s) for rank, s in enumerate(seen) if int(s) != NOT_SEEN}
        if bad:
            first = min(bad, key=lambda rank: (bad[rank], rank))
            raise NonFiniteLossError(
                f"the loss was not finite (NaN or inf) on rank {first} at step {bad[first]}"
                + (f" (and on ranks {', '.join(map(str, sorted(set(bad) - {first})))})" if len(bad) > 1 else "")
                + f"; stopped at step {step} without saving, so the last checkpoint holds the last good state. "
                "Lower the learning rate, clip gradients, or check the data and the loss for values that overflow."
            )
