"""Small, mockable wrappers around the Slurm commands hpcml calls (sinfo, scontrol, sacct)."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from dataclasses import dataclass

from hpcml.errors import SubmissionError


@dataclass(frozen=True)
class Partition:
    name: str
    nodes: int
    is_default: bool


def _slurm(cmd: list[str]) -> str:
    if shutil.which(cmd[0]) is None:
        raise SubmissionError(
            f"`{cmd[0]}` is not on PATH: this machine has no Slurm client. Run `make cluster-up` for the local "
            "cluster, or run from your site's login node."
        )
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise SubmissionError(f"`{' '.join(cmd)}` failed: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def partitions() -> dict[str, Partition]:
    """The cluster's partitions with their node counts; the default one is flagged."""
    found: dict[str, Partition] = {}
    for line in _slurm(["sinfo", "-h", "-o", "%P %D"]).splitlines():
        name, count = line.split()
        is_default = name.endswith("*")
        name = name.rstrip("*")
        # sinfo prints one line per node state; add them up.
        prev = found.get(name)
        found[name] = Partition(
            name, int(count) + (prev.nodes if prev else 0), is_default or bool(prev and prev.is_default)
        )
    return found


def current_job_id(environ: dict[str, str]) -> str | None:
    """The id `scontrol` accepts for this job: `<array>_<task>` for an array task, else the job id."""
    if "SLURM_ARRAY_JOB_ID" in environ and "SLURM_ARRAY_TASK_ID" in environ:
        return f"{environ['SLURM_ARRAY_JOB_ID']}_{environ['SLURM_ARRAY_TASK_ID']}"
    return environ.get("SLURM_JOB_ID")


def restart_count(environ: dict[str, str]) -> int:
    """How many times Slurm has requeued and restarted this job."""
    try:
        return int(environ.get("SLURM_RESTART_COUNT", "0"))
    except ValueError:
        return 0


def job_end_time(job_id: str) -> float | None:
    """The job's scheduled end (time limit) as a Unix time; None when it has no limit or Slurm won't say."""
    try:
        text = _slurm(["squeue", "-h", "-j", job_id, "-o", "%e"]).strip()
    except (SubmissionError, subprocess.TimeoutExpired):
        return None
    try:
        return time.mktime(time.strptime(text, "%Y-%m-%dT%H:%M:%S"))
    except ValueError:  # "N/A", "Unknown", "NONE": no time limit
        return None


# States of a job that Slurm is putting back in the queue, or already has.
REQUEUED_STATES = ("PENDING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "PREEMPTED")


def job_state(job_id: str) -> str | None:
    try:
        return _slurm(["squeue", "-h", "-j", job_id, "-o", "%T"]).strip() or None
    except (SubmissionError, subprocess.TimeoutExpired):
        return None


def requeue(job_id: str) -> None:
    _slurm(["scontrol", "requeue", job_id])


def set_comment(job_id: str, text: str) -> None:
    """Record a reason where `sacct -o Comment` and `scontrol show job` show it."""
    _slurm(["scontrol", "update", f"JobId={job_id}", f"Comment={text}"])


def max_array_size() -> int:
    """Slurm's MaxArraySize (array indices run from 0 to this minus 1); Slurm's default when unset."""
    match = re.search(r"^MaxArraySize\s*=\s*(\d+)", _slurm(["scontrol", "show", "config"]), re.MULTILINE)
    return int(match.group(1)) if match else 1001


def _query(cmd: list[str]) -> str:
    """stdout of a read-only query, empty when it fails: status must show what it can, not stop."""
    if shutil.which(cmd[0]) is None:
        return ""
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout


def array_task_states(job_ids: list[str]) -> dict[str, tuple[str, str]]:
    """Array task id (`<array>_<index>`) -> (state, elapsed): finished ones from sacct's last attempt,
    live ones from squeue (which wins: sacct lags a running task)."""
    if not job_ids:
        return {}
    arrays = ",".join(sorted({j.split("_")[0] for j in job_ids}))
    states: dict[str, tuple[str, str]] = {}
    for line in _query(["sacct", "-X", "-n", "-P", "-j", arrays, "-o", "JobID,State,Elapsed"]).splitlines():
        parts = line.split("|")
        if len(parts) == 3:
            states[parts[0]] = (parts[1].split()[0], parts[2])
    for line in _query(["squeue", "-h", "-r", "-j", arrays, "-o", "%i|%T|%M"]).splitlines():
        parts = line.split("|")
        if len(parts) == 3:
            states[parts[0]] = (parts[1], parts[2])
    return states
