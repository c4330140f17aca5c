"""Signals, deadlines and stop requests -> one agreed stop at a step boundary -> save -> requeue (or, for a
request, a clean end) -> distinct exit.

Slurm warns in different ways: `--signal` (USR2 by default) before the time limit, SIGTERM to every
rank when a preemption starts, SIGTERM on `scancel` and `scontrol requeue`; some ranks may hear nothing
at all. A handler only records the signal. At each step boundary the ranks all-reduce their flags, so
they all stop at the same step, save once, and rank 0 requeues the job. The deadline check needs no
signal: rank 0 compares the job's end time with how long a save takes.
"""

from __future__ import annotations

import enum
import json
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from hpcml.compute import early_signals, mpi


class StopReason(enum.IntEnum):
    """Ordered by priority: when ranks disagree, the largest value wins in the all-reduce."""

    NONE = 0
    DEADLINE = 1
    SIGNAL = 2
    # A stop request file (a study pruning the trial): the run ends here for good, so it outranks a requeue.
    REQUESTED = 3


# Exit statuses of a rank, documented in the README. Slurm and sacct show them as the job's exit code.
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_REQUEUED = 3  # stopped at a step boundary, checkpoint committed, job requeued: it resumes by itself
EXIT_STOPPED = 4  # stopped and checkpointed, but not requeued (not under Slurm, or preempt.requeue=false)
EXIT_REQUEUE_LIMIT = 5  # stopped and checkpointed, but preempt.max_requeues was reached: the job fails


class PreemptionGuard:
    """Records the first warning signal; never does work inside a handler."""

    def __init__(self, signals: list[signal.Signals]):
        self.signals = list(dict.fromkeys(signals))
        self.received: signal.Signals | None = None
        self.heard: set[signal.Signals] = set()  # every signal that came, the first one too
        self._previous: dict[signal.Signals, object] = {}
        self._ignoring = False

    def _handle(self, signum: int, frame) -> None:
        self.heard.add(signal.Signals(signum))
        if self.received is None:
            self.received = signal.Signals(signum)

    def __enter__(self) -> PreemptionGuard:
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        if early_signals.SEEN and self.received is None:
            # A warning that came while the process was still importing (hpcml.compute.early_signals).
            self.received = signal.Signals(early_signals.SEEN[0])
        return self

    def __exit__(self, *exc) -> None:
        if not self._ignoring:
            for sig, previous in self._previous.items():
                signal.signal(sig, previous)
        self._previous.clear()

    def ignore_late_signals(self) -> None:
        """From now on, and after the guard closes: a time-limit warning that arrives while a finished
        rank exits must not kill it (USR2's default action terminates the process, and mpirun forwards it
        to every rank)."""
        self._ignoring = True
        for sig in self.signals:
            signal.signal(sig, signal.SIG_IGN)


class Deadline:
    """When to stop so that a save finishes before the job's time limit."""

    def __init__(self, end_time: float | None, margin_s: float, clock: Callable[[], float] = time.time):
        self.end_time = end_time
        self.margin_s = margin_s
        self.clock = clock

    def reached(self, save_estimate_s: float, step_estimate_s: float) -> bool:
        if self.end_time is None:
            return False
        # Two saves' worth of room: the estimate comes from the last save, and disks slow down.
        needed = 2 * save_estimate_s + step_estimate_s + self.margin_s
        return self.clock() + needed >= self.end_time


@dataclass(frozen=True)
class BoundaryDecision:
    """What every rank does at this step boundary, identical on all of them."""

    stop: StopReason
    save: bool


class StopRequest:
    """Rank 0's look for a stop request file, at most once a second: a stat per step on a shared filesystem
    would cost more than some steps do."""

    def __init__(self, path: Path | None, every_s: float = 1.0, clock: Callable[[], float] = time.monotonic):
        self.path = path
        self.every_s = every_s
        self.clock = clock
        self._next_look = 0.0
        self.reason: str | None = None

    def made(self) -> bool:
        if self.reason is not None:
            return True
        if self.path is None or self.clock() < self._next_look:
            return False
        self._next_look = self.clock() + self.every_s
        try:
            self.reason = str(json.loads(self.path.read_text()).get("reason", "stop requested"))
        except FileNotFoundError:
            return False
        except (OSError, ValueError, AttributeError):
            self.reason = f"stop requested ({self.path} is unreadable)"
        return True


@dataclass
class StopCoordinator:
    """Combines every rank's signal flag and rank 0's clock-based triggers into one shared decision."""

    guard: PreemptionGuard
    deadline: Deadline
    device: torch.device
    world_size: int
    is_main: bool
    # With an MPI world the flags go over MPI: far cheaper per step than gloo, and no device synchronise on GPUs.
    # Polled against the same timeout torch.distributed's collectives have.
    over_mpi: bool = False
    timeout_s: float = 300.0
    request: StopRequest = field(default_factory=lambda: StopRequest(None))

    def local_reason(self, save_estimate_s: float, step_estimate_s: float) -> StopReason:
        if self.is_main and self.request.made():
            return StopReason.REQUESTED
        if self.guard.received is not None:
            return StopReason.SIGNAL
        if self.is_main and self.deadline.reached(save_estimate_s, step_estimate_s):
            return StopReason.DEADLINE
        return StopReason.NONE

    def agree(self, save_estimate_s: float, step_estimate_s: float, save_due: bool) -> BoundaryDecision:
        """One tiny all-reduce per step: the strongest stop reason and any rank's wish to save win."""
        reason = self.local_reason(save_estimate_s, step_estimate_s)
        if self.world_size == 1:
            return BoundaryDecision(reason, save_due)
        if self.over_mpi:
            wanted = np.array([int(reason), int(save_due)], dtype=np.int32)
            mpi.world().allreduce_max_(wanted, self.timeout_s, what="the step-boundary stop agreement")
            return BoundaryDecision(StopReason(int(wanted[0])), bool(wanted[1]))
        flags = torch.tensor([int(reason), int(save_due)], dtype=torch.int32, device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return BoundaryDecision(StopReason(int(flags[0])), bool(flags[1]))
