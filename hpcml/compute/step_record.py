"""Marks a job step leaves for the batch shell that launched it (hpcml/compute/batch_shell.sh).

The shell relaunches a step that died at start-up for a reason outside the user's code (an MPI start-up
crash), and must not relaunch one that failed on the user's config or code. It cannot tell from srun's
exit status, so the ranks say it with files in the directory the shell names in HPCML_STEP_RECORD:
`formed` once every rank has joined the world (rank 0 writes it), `user_error.<host>.<pid>` when the
job's config fails before that. Outside such a shell (no variable) nothing is written.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from pathlib import Path

RECORD_ENV = "HPCML_STEP_RECORD"
# How many times the shell has relaunched this attempt's step so far (0 for the first launch).
RETRIES_ENV = "HPCML_STARTUP_RETRIES"
FORMED = "formed"


def _mark(name: str, environ: Mapping[str, str]) -> None:
    where = environ.get(RECORD_ENV)
    if not where:
        return
    try:
        Path(where).mkdir(parents=True, exist_ok=True)
        (Path(where) / name).touch()
    except OSError:  # a mark is advice to the shell; never fail the job over it
        pass


def mark_formed(environ: Mapping[str, str] = os.environ) -> None:
    _mark(FORMED, environ)


def mark_user_error(environ: Mapping[str, str] = os.environ) -> None:
    _mark(f"user_error.{socket.gethostname()}.{os.getpid()}", environ)


def startup_retries(environ: Mapping[str, str] = os.environ) -> int:
    try:
        return int(environ.get(RETRIES_ENV, "0"))
    except ValueError:
        return 0
