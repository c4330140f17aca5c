"""Marks a job step leaves for the batch shell that launched it (hpcml/compute/batch_shell.sh).

The shell relaunches a step that died at start-up for a reason outside the user's code (an MPI start-up
crash), and must not relaunch one that failed on the user's config or code. It cannot tell from srun's
exit status, so the ranks say it with files in the directory the shell names in HPCML_STEP_RECORD:
`formed` once every rank has joined the world (rank 0 writes it), `user_error.<host>.<pid>` when the
job's config or code fails (before that, or after it with an error that is not a lost peer's). A step that
fails after `formed` with no `user_error` and with ranks killed by a signal lost a peer: the shell requeues
the job without that node (`migrations-<job id>` lists the nodes lost so far). `finished` (rank 0, once
every rank has finished the run): a stop signal or a cancel that reaches the step after that is no failure
of the job, and the shell no longer passes stop signals on to it. Outside such a shell (no variable)
nothing is written.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from pathlib import Path

RECORD_ENV = "HPCML_STEP_RECORD"
# The folder of every step's records (and the job's migrations), which the batch script exports.
RECORDS_ENV = "HPCML_STEP_RECORDS"
# How many times the shell has relaunched this attempt's step so far (0 for the first launch).
RETRIES_ENV = "HPCML_STARTUP_RETRIES"
FORMED = "formed"
FINISHED = "finished"


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


def mark_finished(environ: Mapping[str, str] = os.environ) -> None:
    _mark(FINISHED, environ)


def mark_user_error(environ: Mapping[str, str] = os.environ) -> None:
    _mark(f"user_error.{socket.gethostname()}.{os.getpid()}", environ)


def lost_nodes(environ: Mapping[str, str] = os.environ) -> list[str]:
    """The nodes this job lost a peer on, one per migration so far (written by the batch shell)."""
    records, job = environ.get(RECORDS_ENV), environ.get("SLURM_JOB_ID")
    if not records or not job:
        return []
    try:
        return [line.strip() for line in (Path(records) / f"migrations-{job}").read_text().splitlines() if line.strip()]
    except OSError:
        return []


def startup_retries(environ: Mapping[str, str] = os.environ) -> int:
    try:
        return int(environ.get(RETRIES_ENV, "0"))
    except ValueError:
        return 0
