"""A rank still in one step half-way to the collective timeout says where: the stack of each of its threads.

A hung collective fails the job after train.dist_timeout_s, but a timeout names only the rank that gave up,
and MPI_ABORT then kills its peers without a word. The rank that never arrived, stuck in its data loader, a
lock or a driver call, is the one to read; each rank's own stacks, written half-way to the timeout, show it.
"""

from __future__ import annotations

import faulthandler
import time


class StallReport:
    """faulthandler's watchdog, kept armed while steps go on: once a step (with the evaluation or save at its
    end, whose collectives have the same timeout) has run for 3/4 of `after_s` to `after_s`, every thread's
    stack goes to the process's stderr (file descriptor 2: the rank's log under Slurm, whatever sys.stderr has
    become), and training goes on, untouched.

    Arming costs about 50 us (faulthandler starts a new watchdog thread each time), so a step re-arms only
    when the last arming is a quarter of `after_s` old, and a step costs one clock read."""

    def __init__(self, after_s: float):
        self.after_s = after_s
        self._armed_at: float | None = None

    def step_started(self) -> None:
        now = time.monotonic()
        if self._armed_at is None or now - self._armed_at > self.after_s / 4:
            faulthandler.dump_traceback_later(self.after_s, repeat=False, file=2, exit=False)
            self._armed_at = now

    def close(self) -> None:
        # faulthandler has one such timer per process: this cancels whichever is armed.
        if self._armed_at is not None:
            faulthandler.cancel_dump_traceback_later()
            self._armed_at = None
