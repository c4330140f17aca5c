"""Running Slurm's command-line tools, for both halves: the login node's queries and a job's own requeue.

Every call goes through `run` (an error names the command and the fix) or `query` (read-only, empty on
failure, for displays that must show what they can). Slurm's job state names live here, once.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import time

from hpcml.errors import SubmissionError

log = logging.getLogger(__name__)

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
# How long to wait for accounting to record how a COMPLETING job ended. Slurm kills the job KillWait (30 s by
# default) after its TERM, and rank 0 asks only after its save: a TERM at the time limit itself could leave too
# little time to requeue, but hpcml stops and requeues ahead of the limit, from the job's end time.
ACCOUNTING_WAIT_S = 20.0


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


def job_state(job_id: str, accounting_wait_s: float = ACCOUNTING_WAIT_S) -> str | None:
    """The job's state (CANCELLED, TIMEOUT, RUNNING, PENDING, ...); None when Slurm does not answer.

    While a cancelled, timed-out or requeued job's processes are still ending, scontrol says only
    COMPLETING. Accounting has the real state, once slurmdbd has recorded it: on a loaded machine sacct
    still said RUNNING 15 s after a `scancel`, and `scontrol requeue` of that cancelled job would have
    brought it back. So wait up to `accounting_wait_s` for the record of this attempt (the one whose start
    scontrol shows); past that, say COMPLETING. A job requeued while its processes end shows the next
    attempt's expected start and EndTime=Unknown (measured): that is REQUEUED, whatever accounting says."""
    try:
        text = run(["scontrol", "show", "job", "-o", job_id])
    except (SubmissionError, subprocess.TimeoutExpired):
        return None
    found = re.search(r"\bJobState=([A-Z_]+)", text)
    if found is None:
        return None
    if found.group(1) != "COMPLETING":
        return found.group(1)
    if re.search(r"\bEndTime=Unknown\b", text):
        return "REQUEUED"
    started = re.search(r"\bStartTime=(\S+)", text)
    deadline = time.monotonic() + accounting_wait_s
    while True:
        try:
            recorded = attempt_state(job_id, started.group(1) if started else None)
        except (SubmissionError, subprocess.TimeoutExpired) as err:  # a site without accounting: nothing to wait for
            log.warning("job %s is ending, and accounting cannot say why: %s", job_id, err)
            return "COMPLETING"
        if recorded not in (None, "RUNNING"):
            return recorded
        if time.monotonic() >= deadline:
            log.warning("job %s is ending, but accounting had not recorded why after %.0f s", job_id, accounting_wait_s)
            return "COMPLETING"
        time.sleep(0.5)


def attempt_state(job_id: str, started: str | None) -> str | None:
    """The state accounting recorded for the attempt of the job that started at `started` (scontrol's
    StartTime); None while it has no record of that start. SubmissionError when sacct fails."""
    recorded = None
    for line in run(["sacct", "-X", "-D", "-n", "-P", "-j", job_id, "-o", "Start,State"]).splitlines():
        start, _, state = line.partition("|")
        if state and start == started:
            recorded = state.split()[0]  # "CANCELLED by 0" -> CANCELLED; the last such line, as the shell takes
    return recorded
