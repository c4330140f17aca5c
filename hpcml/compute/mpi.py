"""The only module that imports mpi4py: the MPI world, its few collectives, and the job-wide abort.

mpi4py is imported lazily so that single-process and torchrun runs never initialise MPI.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from typing import Any

import numpy as np

from hpcml.errors import CollectiveTimeout


@functools.lru_cache(maxsize=1)
def _mpi():
    import mpi4py

    # Only the main thread calls MPI; asking for less than THREAD_MULTIPLE avoids slow paths in some MPIs.
    mpi4py.rc.thread_level = "funneled"
    from mpi4py import MPI

    return MPI


def is_initialized() -> bool:
    if "mpi4py.MPI" not in sys.modules:
        return False
    return _mpi().Is_initialized() and not _mpi().Is_finalized()


class MPIWorld:
    """COMM_WORLD with the operations hpcml needs, in numpy/pickle terms."""

    def __init__(self) -> None:
        self.comm = _mpi().COMM_WORLD

    @property
    def rank(self) -> int:
        return self.comm.Get_rank()

    @property
    def size(self) -> int:
        return self.comm.Get_size()

    def broadcast(self, value: Any, root: int = 0) -> Any:
        return self.comm.bcast(value, root=root)

    def allgather(self, value: Any) -> list[Any]:
        return self.comm.allgather(value)

    def allreduce_sum_(self, buffer: np.ndarray) -> None:
        """Sum `buffer` over all ranks, in place (no temporary copy)."""
        self.comm.Allreduce(_mpi().IN_PLACE, buffer, op=_mpi().SUM)

    def allreduce_max_(self, buffer: np.ndarray, timeout_s: float, what: str) -> None:
        """Elementwise max of `buffer` over all ranks, in place; raises CollectiveTimeout after `timeout_s`.

        MPI's blocking collectives wait forever for a stuck peer, so this one is started nonblocking and
        polled against a deadline. Each poll yields the core: ranks may share cores with the one they wait for.
        """
        request = self.comm.Iallreduce(_mpi().IN_PLACE, buffer, op=_mpi().MAX)
        deadline = time.monotonic() + timeout_s
        while not request.Test():
            if time.monotonic() > deadline:
                raise CollectiveTimeout(
                    f"rank {self.rank}: not every rank of {self.size} reached {what} within {timeout_s:g} s "
                    "(train.dist_timeout_s): a rank is stuck or died, and its log says where. Raise "
                    "train.dist_timeout_s if that really takes so long."
                )
            os.sched_yield()  # not time.sleep(0): Linux's timer slack makes that a 50 us nap per poll

    def allreduce_max(self, value: float) -> float:
        """The largest of one number over all ranks, on every rank."""
        return self.comm.allreduce(value, op=_mpi().MAX)

    def barrier(self) -> None:
        self.comm.Barrier()

    def abort(self, code: int = 1) -> None:
        """End every rank of the job now: a peer blocked in a collective must not wait forever."""
        self.comm.Abort(code)


@functools.lru_cache(maxsize=1)
def world() -> MPIWorld:
    return MPIWorld()


def abort_if_running(code: int) -> bool:
    """Abort the MPI job if MPI is up with more than one rank; returns False when there is nothing to abort."""
    if is_initialized() and world().size > 1:
        world().abort(code)
        return True
    return False
