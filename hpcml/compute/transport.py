"""Which library carries each gradient all-reduce: torch.distributed's process group, or MPI.

Neither wins everywhere on CPU nodes (docs/PERFORMANCE.md): within a node Open MPI's shared memory is
several times faster than gloo for buffers up to tens of MB, while between nodes gloo's TCP rings beat
Open MPI's TCP path. So with `train.transport=auto` the ranks time both on the buffer sizes their
gradients are reduced in (DDP's buckets, or the one flat buffer), once per job, and each size takes the
faster. The timings are maxed over ranks by an all-reduce, so every rank makes the same choice. The plan
is saved in checkpoints and reused on resume at the same world size: the summation order, and so
bitwise-exact resume, survives.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from hpcml.compute import mpi

log = logging.getLogger(__name__)

TORCH = "torch"
MPI = "mpi"
AUTO = "auto"  # train.transport: probe both, per buffer size
# Probe sizes: a ladder by factors of 4, from here up to the largest bucket.
SMALLEST_PROBE_BYTES = 64 << 10
# Each size is timed in rounds that alternate the transports, each round filling about this long per
# transport; the median round decides, since between nodes a single round is noisy enough to pick the slower.
PROBE_ROUNDS = 3
PROBE_BUDGET_S = 0.01


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


def probe(
    sizes: list[int], budget_s: float = PROBE_BUDGET_S, rounds: int = PROBE_ROUNDS
) -> tuple[TransportPlan, list[dict[str, float]]]:
    """Time torch.distributed and MPI all-reduces of each size on this job's ranks (collective: every rank)."""
    world = mpi.world()
    choices: dict[int, str] = {}
    timings = []
    for nbytes in sizes:
        tensor = torch.zeros(nbytes // 4)
        array = tensor.numpy()  # same memory: both transports touch the same pages
        ops = {TORCH: lambda t=tensor: dist.all_reduce(t), MPI: lambda a=array: world.allreduce_sum_(a)}
        iters = {name: iterations_for(op, budget_s) for name, op in ops.items()}
        per_round: dict[str, list[float]] = {name: [] for name in ops}
        # Every rank sees the same maxed times, so every rank stops after the same round and takes the same median.
        while (chosen := settled_choice(per_round, rounds)) is None:
            for name, op in ops.items():
                per_round[name].append(mean_time(op, iters[name], warmup=0))
        choices[nbytes] = chosen
        seconds = {name: statistics.median(times) for name, times in per_round.items()}
        timings.append({"bytes": nbytes, "rounds": len(per_round[TORCH]), **seconds})
    return TransportPlan(choices), timings


def settled_choice(per_round: dict[str, list[float]], rounds: int) -> str | None:
    """The transport with the lower median over `rounds` rounds (ties: torch), once the rounds still to come
    cannot change it; None while they can.

    A median only moves with its values, so the rounds to come can pull it no lower than all of them taking
    no time and no higher than all taking for ever. When the two transports differ a lot (within a node),
    2 rounds of 3 (3 of 5) settle it, with exactly the choice all rounds give. Between nodes, where the two
    are close, every round runs.
    """
    done = len(per_round[TORCH])
    if done == 0:
        return None
    to_come = rounds - done
    low = {name: statistics.median(times + [0.0] * to_come) for name, times in per_round.items()}
    high = {name: statistics.median(times + [math.inf] * to_come) for name, times in per_round.items()}
    if high[MPI] < low[TORCH]:
        return MPI
    if high[TORCH] <= low[MPI]:
        return TORCH
    return None


class TransportSelector:
    """Which transport reduces a buffer of a given size in this job.

    Fixed by `train.transport` (torch or mpi), or with auto left open until `decide` probes, once per job;
    an auto plan goes into checkpoints (`state_dict`) and a resume at the same world size reuses it.
    """

    def __init__(self, requested: str, world_size: int):
        self.requested = requested
        self.world_size = world_size
        self.plan: TransportPlan | None = None if requested == AUTO else TransportPlan.always(requested)
        self._by_bytes: dict[int, str] = {}

    def for_bytes(self, nbytes: int) -> str:
        """The plan's choice (looked up once per size: this runs per bucket per step); torch before `decide`."""
        chosen = self._by_bytes.get(nbytes)
        if chosen is None:
            if self.plan is None:  # DDP's throwaway settle() backward, before the probe
                return TORCH
            chosen = self._by_bytes[nbytes] = self.plan.for_bytes(nbytes)
        return chosen

    def decide(self, sizes: list[int], rounds: int = PROBE_ROUNDS) -> None:
        """Probe `sizes` (a collective call) unless the plan is fixed or came from a checkpoint."""
        if self.plan is not None:
            return
        self.plan, timings = probe(sizes, rounds=rounds)
        self._by_bytes.clear()
        log.info(
            "all-reduce transport by buffer size (bytes): %s (probe: %s)",
            self.plan.as_state(),
            ", ".join(
                f"{t['bytes']}B torch {t[TORCH] * 1e3:.2f}ms mpi {t[MPI] * 1e3:.2f}ms ({t['rounds']} rounds)"
                for t in timings
            ),
        )

    def state_dict(self) -> dict:
        plan = self.plan.as_state() if self.plan is not None and self.requested == AUTO else None
        return {"transport_plan": plan, "world_size": self.world_size}

    def load_state_dict(self, state: dict | None) -> None:
        """Reuse a checkpoint's plan at the same world size, so the summation order is unchanged."""
        if state and state.get("transport_plan") and state["world_size"] == self.world_size and self.requested == AUTO:
            self.plan = TransportPlan.from_state(state["transport_plan"])
            self._by_bytes.clear()
            log.info("all-reduce transports from the checkpoint: %s", self.plan.as_state())


def allreduce_sum_(buffer: torch.Tensor, transport: str) -> torch.futures.Future:
    """Sum `buffer` over ranks in place; a future DDP's comm hook can return (MPI completes at once)."""
    if transport == MPI:
        mpi.world().allreduce_sum_(buffer.numpy())
        done: torch.futures.Future = torch.futures.Future()
        done.set_result(buffer)
        return done
    return dist.all_reduce(buffer, async_op=True).get_future().then(lambda fut: fut.value()[0])
