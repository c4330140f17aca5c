"""A rank still in one step half-way to the collective timeout says where: the stack of each of its threads.

A hung collective fails the job after train.dist_timeout_s, but a timeout names only the rank that gave up,
and MPI_ABORT then kills its peers without a word. The rank that never arrived, stuck in its data loader, a
lock or a driver call, is the one to read; each rank's own stacks, written half-way to the timeout, show it.
"""

from __future__ import annotations

import faulthandler


class StallReport:
    """faulthandler's watchdog, armed again at each step's start: if the step (with the evaluation or save at
    its end, whose collectives have the same timeout) has not ended `after_s` later, every thread's stack goes
    to the process's stderr (file descriptor 2: the rank's log under Slurm, whatever sys.stderr has become),
    and training goes on, untouched."""

    def __init__(self, after_s: float):
        self.after_s = after_s
        self._armed = False

    def step_started(self) -> None:
        # Re-arming replaces the pending timer; one C watchdog thread serves every arming.
        faulthandler.dump_traceback_later(self.after_s, repeat=False, file=2, exit=False)
        self._armed = True

    def close(self) -> None:
        # faulthandler has one such timer per process: this cancels whichever is armed.
        if self._armed:
            faulthandler.cancel_dump_traceback_later()
            self._armed = False
