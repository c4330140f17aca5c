"""Signal and deadline paths, driven by injected signals and clocks: no sleeping."""

import os
import signal

import pytest
import torch

from hpcml.compute import runtime, slurm_job
from hpcml.compute.preempt import (
    EXIT_REQUEUE_LIMIT,
    EXIT_REQUEUED,
    EXIT_STOPPED,
    Deadline,
    PreemptionGuard,
    StopCoordinator,
    StopReason,
)
from hpcml.config import PreemptConfig, TrainJobConfig, parse_signal
from hpcml.errors import ConfigError, SubmissionError


def test_guard_records_the_first_signal_and_restores_handlers():
    before = signal.getsignal(signal.SIGUSR2)
    with PreemptionGuard([signal.SIGUSR2, signal.SIGTERM]) as guard:
        assert guard.received is None
        os.kill(os.getpid(), signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.received == signal.SIGUSR2
    assert signal.getsignal(signal.SIGUSR2) is before


def test_deadline_with_an_injected_clock():
    now = [1000.0]
    deadline = Deadline(end_time=1100.0, margin_s=10.0, clock=lambda: now[0])
    assert not deadline.reached(save_estimate_s=20.0, step_estimate_s=1.0)  # needs 51 s, has 100
    now[0] = 1050.0
    assert deadline.reached(save_estimate_s=20.0, step_estimate_s=1.0)  # needs 51 s, has 50
    assert not Deadline(None, 10.0).reached(1e9, 1e9)  # no time limit: never


def coordinator(guard, end_time=None, is_main=True, now=0.0):
    return StopCoordinator(guard, Deadline(end_time, 0.0, clock=lambda: now), torch.device("cpu"), 1, is_main)


def test_signal_beats_deadline_and_only_rank_0_watches_the_clock():
    guard = PreemptionGuard([])
    assert coordinator(guard, end_time=5.0, now=10.0).agree(1.0, 1.0, False).stop is StopReason.DEADLINE
    assert coordinator(guard, end_time=5.0, now=10.0, is_main=False).agree(1.0, 1.0, False).stop is StopReason.NONE
    guard.received = signal.SIGTERM
    decision = coordinator(guard, end_time=5.0, now=10.0).agree(1.0, 1.0, True)
    assert decision.stop is StopReason.SIGNAL and decision.save


@pytest.mark.parametrize(
    "name, expected", [("USR2", signal.SIGUSR2), ("SIGTERM", signal.SIGTERM), ("urg", signal.SIGURG)]
)
def test_parse_signal(name, expected):
    assert parse_signal(name) == expected


@pytest.mark.parametrize(
    "bad, fragment", [("USR1", "NCCL"), ("KILL", "cannot be caught"), ("BOGUS", "not a signal name")]
)
def test_unusable_signals_are_refused(bad, fragment):
    with pytest.raises(ConfigError, match=fragment):
        PreemptConfig(signal=bad)


@pytest.fixture
def slurm_calls(monkeypatch):
    calls = []
    monkeypatch.setattr(slurm_job, "requeue", lambda job: calls.append(("requeue", job)))
    monkeypatch.setattr(slurm_job, "set_comment", lambda job, text: calls.append(("comment", job, text)))
    monkeypatch.setattr(slurm_job, "state", lambda job: "RUNNING")
    return calls


def test_requeue_under_slurm(monkeypatch, slurm_calls):
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert runtime.requeue_or_stop(TrainJobConfig(), StopReason.SIGNAL) == EXIT_REQUEUED
    assert slurm_calls == [("requeue", "42")]


def test_array_tasks_are_requeued_by_their_own_id(monkeypatch, slurm_calls):
    monkeypatch.setenv("SLURM_JOB_ID", "43")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "40")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    runtime.requeue_or_stop(TrainJobConfig(), StopReason.SIGNAL)
    assert slurm_calls == [("requeue", "40_3")]


def test_requeue_cap_fails_the_job_with_a_recorded_reason(monkeypatch, slurm_calls):
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "3")
    cfg = TrainJobConfig(preempt=PreemptConfig(max_requeues=3))
    assert runtime.requeue_or_stop(cfg, StopReason.DEADLINE) == EXIT_REQUEUE_LIMIT
    assert slurm_calls == [("comment", "42", "hpcml: requeue cap reached (3 restarts, preempt.max_requeues=3)")]


def test_outside_slurm_or_with_requeue_off_it_only_stops(monkeypatch, slurm_calls):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert runtime.requeue_or_stop(TrainJobConfig(), StopReason.SIGNAL) == EXIT_STOPPED
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    assert (
        runtime.requeue_or_stop(TrainJobConfig(preempt=PreemptConfig(requeue=False)), StopReason.SIGNAL) == EXIT_STOPPED
    )
    assert slurm_calls == []


def test_a_failed_requeue_is_reported_not_hidden(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "42")

    def refuse(job):
        raise SubmissionError("scontrol: Job is not requeueable")

    monkeypatch.setattr(slurm_job, "requeue", refuse)
    monkeypatch.setattr(slurm_job, "state", lambda job: "RUNNING")
    assert runtime.requeue_or_stop(TrainJobConfig(), StopReason.SIGNAL) == EXIT_STOPPED


def test_a_job_slurm_is_already_requeueing_counts_as_requeued(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "42")

    def already(job):
        raise SubmissionError("`scontrol requeue 42` failed: Job is pending execution for job 42")

    monkeypatch.setattr(slurm_job, "requeue", already)
    monkeypatch.setattr(slurm_job, "state", lambda job: "RUNNING")
    assert runtime.requeue_or_stop(TrainJobConfig(), StopReason.SIGNAL) == EXIT_REQUEUED


def test_a_cancelled_job_is_never_requeued(monkeypatch, slurm_calls):
    """`scancel <job>` ends it: Slurm would accept a requeue and bring it back, so rank 0 must not ask."""
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setattr(slurm_job, "state", lambda job: "CANCELLED")
    assert runtime.requeue_or_stop(TrainJobConfig(), StopReason.SIGNAL) == EXIT_STOPPED
    assert slurm_calls == []


def accounting_that_lags(
    monkeypatch, answers: list[str | Exception], ended: str = "2026-11-30T10:45:00"
) -> list[float]:
    """scontrol says COMPLETING for the attempt that started at 10:44:25; sacct gives `answers` in turn (the
    last one for ever). Sleeping only moves a fake clock on; returns the sleeps."""
    from hpcml import slurm_commands

    scontrol = f"JobId=42 JobState=COMPLETING Reason=None StartTime=2026-11-30T10:44:25 EndTime={ended}\n"
    looks = iter(answers)

    def run(cmd: list[str]) -> str:
        if cmd[0] == "sacct":
            answer = next(looks, answers[-1])
            if isinstance(answer, Exception):
                raise answer
            return answer
        return scontrol

    monkeypatch.setattr(slurm_commands, "run", run)
    sleeps: list[float] = []
    clock = [0.0]
    monkeypatch.setattr(slurm_commands.time, "monotonic", lambda: clock[0])

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        clock[0] += seconds

    monkeypatch.setattr(slurm_commands.time, "sleep", sleep)
    return sleeps


def test_a_job_state_hidden_behind_completing_is_read_from_accounting(monkeypatch):
    from hpcml import slurm_commands

    sleeps = accounting_that_lags(monkeypatch, ["2026-11-30T10:44:25|CANCELLED by 0\n"])
    assert slurm_job.state("42") == "CANCELLED" and sleeps == []
    monkeypatch.setattr(slurm_commands, "run", lambda cmd: "JobId=42 JobState=RUNNING Reason=None\n")
    assert slurm_job.state("42") == "RUNNING"


def test_accounting_that_has_not_recorded_the_end_yet_is_waited_for(monkeypatch):
    """Measured in CI: sacct said RUNNING 15 s after a `scancel`. Read then, the job looked running, and
    rank 0 (or the study driver) would have requeued the cancelled job: Slurm accepts that and brings it back.
    The record is this attempt's, found by its start: the earlier attempt's REQUEUED is not the answer."""
    earlier = "2026-11-30T10:40:00|REQUEUED\n"
    sleeps = accounting_that_lags(
        monkeypatch,
        [earlier, earlier + "2026-11-30T10:44:25|RUNNING\n", earlier + "2026-11-30T10:44:25|CANCELLED by 0\n"],
    )
    assert slurm_job.state("42") == "CANCELLED"
    assert sleeps == [0.5, 0.5]


def test_accounting_silent_past_the_wait_leaves_the_state_completing(monkeypatch, caplog):
    from hpcml import slurm_commands

    sleeps = accounting_that_lags(monkeypatch, ["2026-11-30T10:44:25|RUNNING\n"])
    assert slurm_commands.job_state("42", accounting_wait_s=3) == "COMPLETING"
    assert sum(sleeps) == 3
    assert "accounting had not recorded why after 3 s" in caplog.text


def test_a_cluster_without_accounting_is_not_waited_for(monkeypatch):
    from hpcml.errors import SubmissionError

    disabled = SubmissionError("`sacct ...` failed: Slurm accounting storage is disabled")
    sleeps = accounting_that_lags(monkeypatch, [disabled])
    assert slurm_job.state("42") == "COMPLETING" and sleeps == []


def test_a_job_requeued_while_its_processes_end_is_requeued_whatever_accounting_says(monkeypatch):
    sleeps = accounting_that_lags(monkeypatch, ["2026-11-30T10:44:25|RUNNING\n"], ended="Unknown")
    assert slurm_job.state("42") == "REQUEUED" and sleeps == []


def test_signals_after_the_run_are_ignored_not_fatal():
    before = signal.getsignal(signal.SIGUSR2)
    try:
        with PreemptionGuard([signal.SIGUSR2]) as guard:
            guard.ignore_late_signals()
        os.kill(os.getpid(), signal.SIGUSR2)  # with the default action this would end pytest
        assert signal.getsignal(signal.SIGUSR2) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGUSR2, before)


def test_a_warning_during_start_up_is_remembered(monkeypatch):
    from hpcml.compute import early_signals

    saved = {s: signal.getsignal(s) for s in (signal.SIGUSR2, signal.SIGTERM)}
    monkeypatch.setattr(early_signals, "SEEN", [])
    try:
        for s in saved:
            signal.signal(s, signal.SIG_DFL)
        assert not early_signals.install_if_launched({})  # a login node: nothing installed
        assert signal.getsignal(signal.SIGUSR2) is signal.SIG_DFL
        assert early_signals.install_if_launched({"SLURM_STEP_ID": "0"})
        os.kill(os.getpid(), signal.SIGUSR2)  # arrives while "importing torch"
        with PreemptionGuard([signal.SIGUSR2, signal.SIGTERM]) as guard:
            assert guard.received == signal.SIGUSR2
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


AGREE_SCRIPT = """
import os, sys, time
import numpy as np
from hpcml.compute import mpi
from hpcml.errors import CollectiveTimeout
world = mpi.world()
flags = np.array([world.rank, 1 - world.rank], dtype=np.int32)
world.allreduce_max_(flags, timeout_s=30, what="the first agreement")
print(f"rank {world.rank} agreed {flags.tolist()}", flush=True)
if world.rank == 1:
    time.sleep(3)  # stuck, as far as rank 0 can tell
try:
    world.allreduce_max_(flags, timeout_s=0.5, what="the second agreement")
except CollectiveTimeout as err:
    print(err, flush=True)
    os._exit(3)  # as a failed rank does (MPI_Finalize with a request in flight could wait for ever)
"""


@pytest.mark.mpi
def test_the_mpi_stop_agreement_maxes_flags_and_times_out_instead_of_hanging():
    import subprocess

    from helpers import PYTHON, ROOT, mpi_env

    cmd = ["mpirun", "--oversubscribe", "--bind-to", "none", "-np", "2", PYTHON, "-c", AGREE_SCRIPT]
    done = subprocess.run(cmd, cwd=ROOT, env=mpi_env(), capture_output=True, text=True, timeout=120)
    assert "rank 0 agreed [1, 1]" in done.stdout and "rank 1 agreed [1, 1]" in done.stdout, done.stderr
    # Rank 0 gave up after half a second instead of waiting; its exit then ends the job (as in training).
    assert "rank 0: not every rank of 2 reached the second agreement within 0.5 s" in done.stdout
    assert done.returncode != 0


def test_a_stop_request_is_looked_for_at_most_once_a_second_and_then_kept(tmp_path):
    from hpcml.compute.preempt import StopRequest

    now = [100.0]
    request = StopRequest(tmp_path / "stop_request.json", every_s=1.0, clock=lambda: now[0])
    assert not request.made()
    (tmp_path / "stop_request.json").write_text('{"reason": "pruned by study s after step 40"}')
    now[0] += 0.5
    assert not request.made()  # not looked for again yet
    now[0] += 0.6
    assert request.made() and request.reason == "pruned by study s after step 40"
    (tmp_path / "stop_request.json").unlink()
    assert request.made()  # a stop, once seen, stays decided
    assert not StopRequest(None).made()


def test_a_requested_stop_ends_the_job_successfully_without_a_requeue(monkeypatch):
    from hpcml.compute import runtime

    monkeypatch.setattr(runtime.slurm_job, "requeue", lambda job_id: pytest.fail("a requested stop requeued"))
    assert runtime.requeue_or_stop(TrainJobConfig(), StopReason.REQUESTED) == runtime.EXIT_OK
