"""Catching a loss that is NaN or infinite: a job-wide error naming the rank and step, before any save.

Checking every step would cost a device-to-host synchronisation per step on a GPU. Instead each rank
remembers, on its device, the first step whose loss was not finite, and the ranks compare these at every
logging step and before every save (both already synchronise). One rank's NaN reaches every replica through
the gradient average, so a save after it would write NaN weights over the last good checkpoint: `check`
runs first and fails the job instead.

With an MPI world the steps are compared over MPI, as the step-boundary stop agreement is: an order of
magnitude faster than gloo for these few integers, and an asynchronous save holds training for this check.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from hpcml.compute import mpi
from hpcml.compute.dist import DistributedContext
from hpcml.errors import NonFiniteLossError

NOT_SEEN = -1


class NonFiniteLossWatch:
    def __init__(self, ctx: DistributedContext, timeout_s: float = 300.0):
        self.ctx = ctx
        self.timeout_s = timeout_s  # MPI's wait for every rank's answer (train.dist_timeout_s)
        self.first_bad_step = torch.full((), NOT_SEEN, dtype=torch.int64, device=ctx.device)

    def observe(self, loss: torch.Tensor, step: int) -> None:
        """Remember `step` if `loss` is not finite and no earlier step was (no synchronisation)."""
        unseen = self.first_bad_step == NOT_SEEN
        bad = ~torch.isfinite(loss.detach())
        self.first_bad_step = torch.where(unseen & bad, torch.full_like(self.first_bad_step, step), self.first_bad_step)

    def check(self, step: int) -> None:
        """A collective: every rank raises NonFiniteLossError if any rank has seen a non-finite loss."""
        seen = self.every_ranks_first_bad_step()
        bad = {rank: first_bad for rank, first_bad in enumerate(seen) if first_bad != NOT_SEEN}
        if bad:
            first = min(bad, key=lambda rank: (bad[rank], rank))
            raise NonFiniteLossError(
                f"the loss was not finite (NaN or inf) on rank {first} at step {bad[first]}"
                + (f" (and on ranks {', '.join(map(str, sorted(set(bad) - {first})))})" if len(bad) > 1 else "")
                + f"; stopped at step {step} without saving, so the last checkpoint holds the last good state. "
                "Lower the learning rate, clip gradients, or check the data and the loss for values that overflow."
            )

    def every_ranks_first_bad_step(self) -> list[int]:
        """Each rank's first step with a non-finite loss (NOT_SEEN if none), by rank (a collective)."""
        if self.ctx.world_size == 1:
            return [int(self.first_bad_step)]
        if self.ctx.uses_mpi:
            # An all-gather as a max: every rank fills its own slot, and NOT_SEEN is below any step.
            seen = np.full(self.ctx.world_size, NOT_SEEN, dtype=np.int64)
            seen[self.ctx.rank] = int(self.first_bad_step)
            mpi.world().allreduce_max_(seen, self.timeout_s, what="the non-finite loss check")
            return [int(step) for step in seen]
        gathered = [torch.empty_like(self.first_bad_step) for _ in range(self.ctx.world_size)]
        dist.all_gather(gathered, self.first_bad_step)
        return [int(step) for step in gathered]
