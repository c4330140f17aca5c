"""Which library carries each gradient all-reduce: torch.distributed's process group, or MPI.

Neither wins everywhere on CPU nodes (docs/PERFORMANCE.md): within a node Open MPI's shared memory is
several times faster than gloo for buffers up to tens of MB, while between nodes gloo's TCP rings beat
Open MPI's TCP path. So with `train.ddp_transport=auto` the ranks time both on the buffer sizes their
gradient buckets can have, once per job, and every bucket takes the faster one. The timings are maxed
over ranks by an all-reduce, so every rank makes the same choice. The plan is saved in checkpoints and
reused on resume at the same world size: the summation order, and so bitwise-exact resume, survives.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from hpcml import mpi

log = logging.getLogger(__name__)

TORCH = "torch"
MPI = "mpi"
AUTO = "auto"  # train.ddp_transport: probe both, per bucket size
# Probe sizes: a ladder by factors of 4, from here up to the largest bucket.
SMALLEST_PROBE_BYTES = 64 << 10
PROBE_BUDGET_S = 0.02


def mean_time(op: Callable[[], object], iters: int, warmup: int = 1) -> float:
    """The slowest rank's mean time per call (a collective is done only when every rank is done)."""
    world = mpi.world()
    for _ in range(warmup):
        op()
    world.barrier()
    started = time.perf_counter()
    for _ in range(iters):
        op()
    return world.allreduce_max((time.perf_counter() - started) / iters)


def iterations_for(op: Callable[[], object], budget_s: float, most: int = 200) -> int:
    """How many calls fill `budget_s`, the same on every rank (from one timed call after a warm-up)."""
    once = mean_time(op, iters=1, warmup=1)
    return max(2, min(most, math.ceil(budget_s / max(once, 1e-6))))


def probe_sizes(largest_bytes: int) -> list[int]:
    sizes = [SMALLEST_PROBE_BYTES]
    while sizes[-1] * 4 < largest_bytes:
        sizes.append(sizes[-1] * 4)
    if largest_bytes > sizes[-1]:
        sizes.append(largest_bytes)
    return sizes


@dataclass(frozen=True)
class TransportPlan:
    """For each probed buffer size (bytes), the transport that was faster there."""

    choices: dict[int, str]

    def for_bytes(self, nbytes: int) -> str:
        """The choice at the probed size nearest to `nbytes` on a log scale."""
        nearest = min(self.choices, key=lambda size: abs(math.log(size) - math.log(max(nbytes, 1))))
        return self.choices[nearest]

    def as_state(self) -> dict[str, str]:
        return {str(size): choice for size, choice in sorted(self.choices.items())}

    @staticmethod
    def from_state(state: dict[str, str]) -> TransportPlan:
        return TransportPlan({int(size): choice for size, choice in state.items()})

    @staticmethod
    def always(transport: str) -> TransportPlan:
        return TransportPlan({SMALLEST_PROBE_BYTES: transport})


def probe(largest_bytes: int, budget_s: float = PROBE_BUDGET_S) -> tuple[TransportPlan, list[dict[str, float]]]:
    """Time torch.distributed and MPI all-reduces on this job's ranks (a collective call: every rank)."""
    world = mpi.world()
    choices: dict[int, str] = {}
    timings = []
    for nbytes in probe_sizes(largest_bytes):
        tensor = torch.zeros(nbytes // 4)
        array = tensor.numpy()  # same memory: both transports touch the same pages
        ops = {TORCH: lambda t=tensor: dist.all_reduce(t), MPI: lambda a=array: world.allreduce_sum_(a)}
        seconds = {name: mean_time(op, iterations_for(op, budget_s)) for name, op in ops.items()}
        choices[nbytes] = MPI if seconds[MPI] < seconds[TORCH] else TORCH
        timings.append({"bytes": nbytes, **seconds})
    return TransportPlan(choices), timings


def allreduce_sum_(buffer: torch.Tensor, transport: str) -> torch.futures.Future:
    """Sum `buffer` over ranks in place; a future DDP's comm hook can return (MPI completes at once)."""
    if transport == MPI:
        mpi.world().allreduce_sum_(buffer.numpy())
        done: torch.futures.Future = torch.futures.Future()
        done.set_result(buffer)
        return done
    return dist.all_reduce(buffer, async_op=True).get_future().then(lambda fut: fut.value()[0])
