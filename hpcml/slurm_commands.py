"""Running Slurm's command-line tools, for both halves: the login node's queries and a job's own requeue.

Every call goes through `run` (an error names the command and the fix) or `query` (read-only, empty on
failure, for displays that must show what they can). Slurm's job state names live here, once.
"""

from __future__ import annotations

import re
import shutil
import subprocess

from hpcml.errors import SubmissionError

# States after which a job (or array task) will not run again by itself.
TERMINAL_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
)
# States in which Slurm will still run (or is running) a job without being asked.
ACTIVE_STATES = frozenset(
    {"PENDING", "RUNNING", "REQUEUED", "COMPLETING", "CONFIGURING", "SUSPENDED", "PREEMPTED", "RESIZING"}
)
# States of a job that Slurm is putting back in the queue, or already has.
REQUEUED_STATES = frozenset({"PENDING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "PREEMPTED"})


def run(cmd: list[str]) -> str:
    """stdout of a Slurm command; SubmissionError with its message when it fails or is not installed."""
    if shutil.which(cmd[0]) is None:
        raise SubmissionError(
            f"`{cmd[0]}` is not on PATH: this machine has no Slurm client. Run `make cluster-up` for the local "
            "cluster, or run from your site's login node."
        )
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise SubmissionError(f"`{' '.join(cmd)}` failed: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def query(cmd: list[str]) -> str:
    """stdout of a read-only query, empty when it fails: status must show what it can, not stop."""
    if shutil.which(cmd[0]) is None:
        return ""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout
    except subprocess.TimeoutExpired:
        return ""


def job_state(job_id: str) -> str | None:
    """The job's state (CANCELLED, TIMEOUT, RUNNING, PENDING, ...); None when Slurm does not answer.

    While a cancelled or timed-out job's steps are still ending, scontrol says only COMPLETING (and squeue
    no longer lists it); accounting already has the real state then."""
    try:
        text = run(["scontrol", "show", "job", "-o", job_id])
    except (SubmissionError, subprocess.TimeoutExpired):
        return None
    found = re.search(r"\bJobState=([A-Z_]+)", text)
    if found is None:
        return None
    if found.group(1) == "COMPLETING":
        accounted = query(["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "State"]).split()
        if accounted:
            return accounted[0]  # "CANCELLED by 0" -> CANCELLED
    return found.group(1)
