"""The running job's view of itself in Slurm: its id, restarts, time limit and state; requeue it; say why.

Small functions, one Slurm command each, so tests can replace them; the real commands are proved on the
local cluster.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Mapping

from hpcml import slurm_commands
from hpcml.errors import SubmissionError


def current_job_id(environ: Mapping[str, str]) -> str | None:
    """The id `scontrol` accepts for this job: `<array>_<task>` for an array task, else the job id."""
    if "SLURM_ARRAY_JOB_ID" in environ and "SLURM_ARRAY_TASK_ID" in environ:
        return f"{environ['SLURM_ARRAY_JOB_ID']}_{environ['SLURM_ARRAY_TASK_ID']}"
    return environ.get("SLURM_JOB_ID")


def restart_count(environ: Mapping[str, str]) -> int:
    """How many times Slurm has requeued and restarted this job."""
    try:
        return int(environ.get("SLURM_RESTART_COUNT", "0"))
    except ValueError:
        return 0


def end_time(job_id: str) -> float | None:
    """The job's scheduled end (time limit) as a Unix time; None when it has no limit or Slurm won't say."""
    try:
        text = slurm_commands.run(["squeue", "-h", "-j", job_id, "-o", "%e"]).strip()
    except (SubmissionError, subprocess.TimeoutExpired):
        return None
    try:
        return time.mktime(time.strptime(text, "%Y-%m-%dT%H:%M:%S"))
    except ValueError:  # "N/A", "Unknown", "NONE": no time limit
        return None


def state(job_id: str) -> str | None:
    """The job's state (CANCELLED, TIMEOUT, RUNNING, PENDING, ...); None when Slurm does not answer."""
    return slurm_commands.job_state(job_id)


def requeue(job_id: str) -> None:
    slurm_commands.run(["scontrol", "requeue", job_id])


def set_comment(job_id: str, text: str) -> None:
    """Record a reason where `sacct -o Comment` and `scontrol show job` show it."""
    slurm_commands.run(["scontrol", "update", f"JobId={job_id}", f"Comment={text}"])
