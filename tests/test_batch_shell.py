"""hpcml/compute/batch_shell.sh with a stand-in step and a stand-in scontrol: which failures are retried.

The real thing (srun and mpirun steps, TERM to the batch shell, requeue) runs in
tests/cluster/test_fault_tolerance.py; here each branch of the decision is driven on purpose.
"""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import ROOT

SHELL = ROOT / "hpcml" / "compute" / "batch_shell.sh"

# A step that records each launch, then does what FATE_<launch number> says: "ok", "formed:<rc>" (the
# ranks formed their world, then exited rc), "user:<rc>" (a config error), "crash:<rc>" (died at start-up),
# "wait" (runs until it gets USR2, then exits 3 as stopped ranks do), "finished:<rc>" (rank 0 marked the run
# finished, then the step ended rc: killed as it exited), "finishing" (marked finished, exits 0 a second
# later, and would die of USR2, as a launcher shutting down may).
STEP = r"""#!/bin/bash
n=$(( $(cat "$WORK/launches" 2>/dev/null || echo 0) + 1 )); echo $n > "$WORK/launches"
echo "retries=$HPCML_STARTUP_RETRIES" >> "$WORK/env"
fate_var=FATE_$n; fate=${!fate_var:-ok}
case $fate in
  ok) exit 0 ;;
  formed:*) mkdir -p "$HPCML_STEP_RECORD"; touch "$HPCML_STEP_RECORD/formed"; exit ${fate#*:} ;;
  user:*) mkdir -p "$HPCML_STEP_RECORD"; touch "$HPCML_STEP_RECORD/user_error.x.1"; exit ${fate#*:} ;;
  crash:*) mkdir -p "$HPCML_STEP_RECORD"; exit ${fate#*:} ;;
  lost:*) mkdir -p "$HPCML_STEP_RECORD"; touch "$HPCML_STEP_RECORD/formed"
          [ -n "${ALSO_USER_ERROR:-}" ] && touch "$HPCML_STEP_RECORD/user_error.x.1"
          echo "srun: error: ${fate#lost:}: tasks 2-3: Killed" >&2
          echo "srun: launch/slurm: _step_signal: Terminating StepId=7.0" >&2
          echo "srun: error: n1: tasks 0-1: Killed" >&2
          exit 137 ;;
  mpilost:*) mkdir -p "$HPCML_STEP_RECORD"; touch "$HPCML_STEP_RECORD/formed"
          node_signal=${fate#mpilost:}
          echo "[rank 0] RuntimeError: Connection closed by peer" >&2
          echo "--------------------------------------------------------------------------" >&2
          echo "mpirun noticed that process rank 2 with PID 4242 on node ${node_signal%:*} exited on signal ${node_signal#*:} (Killed)." >&2
          echo "--------------------------------------------------------------------------" >&2
          exit 137 ;;
  finished:*) mkdir -p "$HPCML_STEP_RECORD"; touch "$HPCML_STEP_RECORD/formed" "$HPCML_STEP_RECORD/finished"
          echo "srun: error: n1: tasks 0-1: Killed" >&2; exit ${fate#*:} ;;
  finishing) mkdir -p "$HPCML_STEP_RECORD"; touch "$HPCML_STEP_RECORD/formed" "$HPCML_STEP_RECORD/finished"
          trap 'echo got-usr2 >> "$WORK/signals"; exit 140' USR2
          touch "$WORK/waiting"; for i in $(seq 20); do sleep 0.05; done; exit 0 ;;
  wait) trap 'echo got-usr2 >> "$WORK/signals"; echo "[rank 0] saved after the stop" >&2; exit 3' USR2
        touch "$WORK/waiting"
        for i in $(seq 200); do sleep 0.05; done; exit 9 ;;
esac
"""
SCONTROL = r"""#!/bin/bash
[ "$2" = hostnames ] && { echo "$3" | tr ',' '\n'; exit 0; }
echo "$*" >> "$WORK/scontrol"
[ "$1" = show ] && echo "JobId=7 JobState=${JOB_STATE:-RUNNING} Reason=None StartTime=2026-11-30T10:44:25 EndTime=${END_TIME:-2026-11-30T10:45:00} ExcNodeList=${EXCLUDED:-(null)}"
exit 0
"""
SINFO = r"""#!/bin/bash
printf '%s\n' n1 n2 n1
"""
# Accounting's record of each attempt, by start time (this one started at 10:44:25, after a requeue). For its
# first ACCT_UNRECORDED calls it has no record of this attempt, for the next ACCT_LAG it says RUNNING (slurmdbd
# has not recorded the start, then the end, yet); then ACCT_STATE. ACCT_FAILS: no accounting at all.
SACCT = r"""#!/bin/bash
n=$(( $(cat "$WORK/sacct_calls" 2>/dev/null || echo 0) + 1 )); echo $n > "$WORK/sacct_calls"
[ -n "${ACCT_FAILS:-}" ] && { echo "sacct: error: Slurm accounting storage is disabled" >&2; exit 1; }
echo "2026-11-30T10:40:00|REQUEUED"
[ "$n" -le "${ACCT_UNRECORDED:-0}" ] && exit 0
[ "$n" -le "$(( ${ACCT_UNRECORDED:-0} + ${ACCT_LAG:-0} ))" ] && state=RUNNING || state=${ACCT_STATE:-RUNNING}
echo "2026-11-30T10:44:25|$state"
"""


def run_step(
    tmp_path: Path, step: str = STEP, launcher: str = "step", own_session: bool = False, **env: str
) -> tuple[subprocess.Popen, Path]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in ((launcher, step), ("scontrol", SCONTROL), ("sacct", SACCT), ("sinfo", SINFO)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    environ = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "WORK": str(tmp_path),
        "SLURM_JOB_ID": "7",
        "HPCML_STEP_RECORDS": str(tmp_path / "records"),
        "HPCML_MAX_REQUEUES": "5",
        "HPCML_MAX_MIGRATIONS": "3",
        "HPCML_MIN_NODES": "1",
        "SLURM_JOB_PARTITION": "batch",
        "SLURM_JOB_NODELIST": "n1,n2",
        **env,
    }
    script = f"set -euo pipefail; source {SHELL}; hpcml_run_step {launcher}"
    proc = subprocess.Popen(
        ["bash", "-c", script], env=environ, stderr=subprocess.PIPE, text=True, start_new_session=own_session
    )
    return proc, tmp_path


def launches(work: Path) -> int:
    return int((work / "launches").read_text())


def test_a_clean_step_runs_once(tmp_path):
    proc, work = run_step(tmp_path)
    assert proc.wait(30) == 0 and launches(work) == 1


def test_a_start_up_crash_is_relaunched_and_counted(tmp_path):
    proc, work = run_step(tmp_path, FATE_1="crash:139", FATE_2="crash:1")
    assert proc.wait(30) == 0
    assert launches(work) == 3
    assert (work / "env").read_text().split() == ["retries=0", "retries=1", "retries=2"]
    err = proc.stderr.read()
    assert "died at start-up (exit 139)" in err and "start-up retry 2 of 2" in err
    assert not list((work / "records").glob("step-*"))  # the marks are cleaned up


def test_start_up_retries_are_bounded(tmp_path):
    proc, work = run_step(tmp_path, FATE_1="crash:1", FATE_2="crash:1", HPCML_STARTUP_RETRIES_MAX="1")
    assert proc.wait(30) == 1 and launches(work) == 2
    assert "2 times before its ranks formed their world; giving up" in proc.stderr.read()


@pytest.mark.parametrize("fate", ["formed:1", "user:2"])
def test_a_failure_of_the_job_itself_is_not_retried(tmp_path, fate):
    proc, work = run_step(tmp_path, FATE_1=fate)
    assert proc.wait(30) == int(fate.split(":")[1]) and launches(work) == 1


def test_ranks_killed_on_a_node_after_the_world_formed_requeue_the_job_without_that_node(tmp_path):
    """srun's report names the node whose ranks died of a signal (n2); the ranks it then ended itself (n1,
    killed after "Terminating StepId") are not lost. The job is requeued, then its ExcNodeList set while it
    is pending."""
    proc, work = run_step(tmp_path, launcher="srun", FATE_1="lost:n2", EXCLUDED="n3")
    assert proc.wait(30) == 3 and launches(work) == 1
    calls = (work / "scontrol").read_text().splitlines()
    assert calls[-2:] == ["requeue 7", "update jobid=7 ExcNodeList=n2,n3"]
    assert (work / "records" / "migrations-7").read_text() == "n2\n"
    err = proc.stderr.read()
    assert "srun: error: n2: tasks 2-3: Killed" in err  # srun's own words still reach the job log
    assert "lost the ranks on n2" in err and "migration 1 of 3" in err


def test_ranks_killed_under_mpirun_requeue_the_job_without_the_node_mpirun_names(tmp_path):
    """mpirun's report of the first rank to die names its node; the ranks' own stderr, which comes through
    mpirun too, reaches the job log whole and in order. The batch script fixed 2 tasks per node on 2 nodes:
    with one node left, the job is given 2 tasks, or it would never fit there."""
    proc, work = run_step(
        tmp_path, launcher="mpirun", FATE_1="mpilost:n2:9", SLURM_NTASKS_PER_NODE="2", SLURM_JOB_NUM_NODES="2"
    )
    assert proc.wait(30) == 3 and launches(work) == 1
    calls = (work / "scontrol").read_text().splitlines()
    assert calls[-2:] == ["requeue 7", "update jobid=7 ExcNodeList=n2 NumTasks=2"]
    err = proc.stderr.read()
    ranks_said = (
        "[rank 0] RuntimeError: Connection closed by peer\n" + "-" * 74 + "\nmpirun noticed that process rank 2"
    )
    assert ranks_said in err and "lost the ranks on n2" in err
    assert not list((work / "records").glob("step-*"))


@pytest.mark.parametrize(
    "fate", ["mpilost:n2:11", "mpilost:n2:6", "mpilost:vm:9"], ids=["SIGSEGV", "SIGABRT", "not-a-node-of-the-job"]
)
def test_an_mpirun_rank_that_died_of_its_own_crash_or_on_no_node_of_the_job_is_not_a_lost_node(tmp_path, fate):
    """Only SIGKILL (a node crash, an OOM kill) is a lost peer; a rank's own SIGSEGV or SIGABRT fails the job
    as any error of its code does. A name that is no node of the job's is never excluded."""
    proc, work = run_step(tmp_path, launcher="mpirun", FATE_1=fate)
    assert proc.wait(30) == 137 and launches(work) == 1
    assert "requeue" not in ((work / "scontrol").read_text() if (work / "scontrol").exists() else "")


def test_a_term_to_the_shells_process_group_leaves_the_ranks_stderr_flowing_under_mpirun(tmp_path):
    """`scancel --signal=TERM --full` signals the batch shell's whole process group, the copy of mpirun's
    stderr included: were it to die, the ranks' next words would break the pipe (and kill mpirun)."""
    proc, work = run_step(tmp_path, launcher="mpirun", own_session=True, FATE_1="wait")
    wait_for(work / "waiting")
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(30) == 3
    assert "[rank 0] saved after the stop" in proc.stderr.read()


@pytest.mark.parametrize(
    "env, said",
    [
        ({"ALSO_USER_ERROR": "1"}, None),  # a rank's own code failed: the job fails, whatever else died
        ({"HPCML_MAX_MIGRATIONS": "0"}, "the migration cap is reached (0 of 0"),
        ({"HPCML_MIN_NODES": "2"}, "only 1 nodes of partition batch would be left and the job needs 2"),
    ],
)
def test_a_lost_peer_is_not_migrated_after_a_user_error_at_the_cap_or_without_enough_nodes(tmp_path, env, said):
    proc, work = run_step(tmp_path, launcher="srun", FATE_1="lost:n2", **env)
    assert proc.wait(30) == 137 and launches(work) == 1
    assert "requeue" not in ((work / "scontrol").read_text() if (work / "scontrol").exists() else "")
    if said:
        assert said in proc.stderr.read()


def wait_for(path: Path) -> None:
    deadline = time.monotonic() + 10
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def test_a_term_to_the_shell_reaches_the_step_as_the_stop_signal(tmp_path):
    proc, work = run_step(tmp_path, FATE_1="wait")
    wait_for(work / "waiting")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 3  # the step's status: the shell survived the TERM and waited for it
    assert (work / "signals").read_text().split() == ["got-usr2"]
    assert launches(work) == 1


def test_a_step_killed_after_its_ranks_finished_the_run_is_no_failure_and_no_lost_node(tmp_path):
    """A cancel or a signal reaching a step after rank 0 marked the run finished (every rank past the last
    barrier): the job is done, not failed, and its node is not taken for lost."""
    proc, work = run_step(tmp_path, FATE_1="finished:137")
    assert proc.wait(30) == 0 and launches(work) == 1
    assert "ended with exit 137 after its ranks had finished the run" in proc.stderr.read()
    assert not (work / "scontrol").exists()  # no requeue, no migration


def test_a_stop_for_a_step_whose_ranks_finished_is_not_passed_on(tmp_path):
    """A time-limit warning that comes as the ranks exit: passed on, it could kill the launcher shutting down
    (mpirun exited 140, and a finished job ended FAILED, measured). The shell keeps it."""
    proc, work = run_step(tmp_path, FATE_1="finishing")
    wait_for(work / "waiting")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert not (work / "signals").exists()


# The step "dies of" the forwarded signal before forming its world: exit 140 (USR2) with no mark.
DIES_OF_THE_STOP = STEP.replace("exit 3' USR2", "exit 140' USR2")


def stop_while_starting(tmp_path: Path, **env: str) -> tuple[int, Path, str, float]:
    """TERM to the shell while DIES_OF_THE_STOP is starting: the shell's exit status, the work folder, its
    stderr, and the seconds from the TERM to its exit."""
    proc, work = run_step(tmp_path, DIES_OF_THE_STOP, FATE_1="wait", **env)
    wait_for(work / "waiting")
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(30)
    return code, work, proc.stderr.read(), time.monotonic() - started


@pytest.mark.parametrize(
    "state, accounted, unrecorded, lag, requeued",
    [
        ("RUNNING", "RUNNING", 0, 0, True),
        ("COMPLETING", "CANCELLED by 0", 0, 0, False),
        ("COMPLETING", "CANCELLED by 0", 2, 2, False),  # accounting records the cancel only at its 5th look
        ("COMPLETING", "TIMEOUT", 0, 0, True),
    ],
)
def test_a_stop_that_killed_starting_ranks_requeues_unless_cancelled(
    tmp_path, state, accounted, unrecorded, lag, requeued
):
    code, work, _, _ = stop_while_starting(
        tmp_path, JOB_STATE=state, ACCT_STATE=accounted, ACCT_UNRECORDED=str(unrecorded), ACCT_LAG=str(lag)
    )
    calls = (work / "scontrol").read_text().splitlines()
    assert launches(work) == 1  # never relaunched while a stop is pending
    assert ("requeue 7" in calls) is requeued
    assert code == (3 if requeued else 140)


def test_a_stop_while_accounting_never_records_the_end_requeues_after_the_wait(tmp_path):
    """COMPLETING, and accounting still says RUNNING after HPCML_ACCOUNTING_WAIT_S: the shell says so, and
    requeues (a preempted job must come back; a cancelled one can be cancelled again)."""
    code, work, err, _ = stop_while_starting(
        tmp_path, JOB_STATE="COMPLETING", ACCT_LAG="1000", HPCML_ACCOUNTING_WAIT_S="1"
    )
    assert code == 3
    assert "accounting did not say why (waited up to 1 s)" in err
    assert 1 <= int((work / "sacct_calls").read_text()) <= 5  # every half second for the wait
    assert "requeue 7" in (work / "scontrol").read_text().splitlines()


def test_a_stop_on_a_cluster_without_accounting_does_not_wait_for_it(tmp_path):
    """sacct fails (AccountingStorageType=none): nothing to wait for; the job is requeued at once."""
    code, work, _, seconds = stop_while_starting(tmp_path, JOB_STATE="COMPLETING", ACCT_FAILS="1")
    assert code == 3
    assert seconds < 5  # not the 20 s wait
    assert int((work / "sacct_calls").read_text()) == 1
    assert "requeue 7" in (work / "scontrol").read_text().splitlines()


def test_a_stop_after_the_job_was_requeued_needs_no_accounting_and_no_requeue(tmp_path):
    """COMPLETING with EndTime=Unknown: requeued while its processes end (measured), so accounting, however
    far behind, is not waited for, and the shell does not ask again (Slurm would refuse)."""
    code, work, err, _ = stop_while_starting(tmp_path, JOB_STATE="COMPLETING", END_TIME="Unknown", ACCT_LAG="1000")
    assert code == 3
    assert not (work / "sacct_calls").exists()
    assert "requeue 7" not in (work / "scontrol").read_text().splitlines()
    assert "Slurm is requeueing job 7 already" in err


@pytest.mark.parametrize(
    ("fault", "code"),
    [
        ([], 0),
        (["fault.raise_at_step=2"], 1),
        # Stopped by a signal outside Slurm: saved, not requeued (exit 4), which must not pass for a finished run.
        (["fault.hold_for_signal_at_steps=[2]"], 4),
    ],
    ids=["finished", "failed", "stopped"],
)
def test_rank_0_marks_the_run_finished_only_when_it_ended_well(tmp_path, fault, code):
    """The mark the two tests above act on, from a real run: written once the run ended well, and not after a
    failure or a stop (whose exit statuses the shell must keep)."""
    from helpers import PYTHON, TRAIN

    record, stderr = tmp_path / "record", tmp_path / "stderr"
    args = ["train.steps=3", "train.global_batch_size=8", f"train.output_dir={tmp_path}", f"hydra.run.dir={tmp_path}"]
    with stderr.open("w") as err:
        proc = subprocess.Popen(
            [PYTHON, TRAIN, *args, *fault], cwd=ROOT, env={**os.environ, "HPCML_STEP_RECORD": str(record)}, stderr=err
        )
        if code == 4:
            deadline = time.monotonic() + 60
            while "holding at step 2" not in stderr.read_text():
                assert time.monotonic() < deadline and proc.poll() is None, stderr.read_text()[-3000:]
                time.sleep(0.05)
            proc.send_signal(signal.SIGUSR2)
        assert proc.wait(120) == code, stderr.read_text()[-3000:]
    assert (record / "formed").exists() and (record / "finished").exists() == (code == 0)
