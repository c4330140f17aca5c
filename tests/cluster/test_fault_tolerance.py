"""Preemption, requeue, time limits and crashes on the real local cluster: nothing lost, nothing hung.

Every interrupted run must end bitwise equal to the same run uninterrupted, with one restart per
interrupt. Runs are slowed (fault.step_sleep_s) so that an interrupt lands in the middle of training.
"""

import json
import os
import random
import re
import signal
import subprocess
import time
from functools import partial
from pathlib import Path

import pytest
import torch
from cluster_jobs import (
    SAME_TRANSPORT,
    finish,
    interrupt,
    job_id_of,
    new_out,
    rank0_log,
    submit,
    together,
    wait_for_log,
    wait_for_step,
    wait_until_resumed,
)
from helpers import (
    PYTHON,
    ROOT,
    TRAIN,
    assert_a_restart_per_interrupt,
    assert_nothing_lost,
    attempts,
    mpi_env,
    read_result,
    site_policy,
)
from user_code import USE

# Every run here trains STEPS steps; the slowed ones take 0.05 s a step at least, so that an interrupt lands
# in the middle of training.
STEPS = 200
SLOW = [f"train.steps={STEPS}", "fault.step_sleep_s=0.05", "checkpoint.every_steps=50"]


# A user's model with BatchNorm, a Dataset that draws random augmentation in __getitem__, read by two
# DataLoader workers per rank (tests/user_code.py, tests/user_conf/), sharded (FSDP) over the 4 ranks:
# the built-in model's runs here, and the LM's (test_lm_on_cluster.py), cover DDP.
USER_RUN = [
    *USE,
    "+model.batchnorm=true",
    "+data.train.noise=0.3",
    "loader.num_workers=2",
    "launch.objective=val_mse",
    "train.grad_sync=fsdp",
]


@pytest.fixture(scope="module")
def references() -> dict[str, Path]:
    """The uninterrupted runs the interrupted ones must equal, bitwise: the built-in model's (DDP) and the
    user's (FSDP). Submitted together (each takes half the cluster's CPUs), and followed to the end."""
    runs = {"builtin": (new_out("reference"), []), "user": (new_out("user-reference"), USER_RUN)}
    running = {name: submit(out, *args, f"train.steps={STEPS}") for name, (out, args) in runs.items()}
    for proc in running.values():
        finish(proc)
    return {name: out for name, (out, _) in runs.items()}


@pytest.fixture(scope="module")
def reference_sha(references):
    return read_result(references["builtin"])["params_sha256"]


def test_every_kind_of_interrupt_in_one_sharded_run_of_user_code_at_a_strict_site_resumes_bitwise_equal(references):
    """`scontrol requeue`, `scancel --signal=TERM` and a preemption, in a random order at random steps of one
    FSDP run (2 nodes x 2 ranks) of a user's BatchNorm model on an augmenting Dataset with DataLoader workers:
    each attempt saves a sharded checkpoint, comes back by itself and resumes at exactly the step the last one
    stopped at. Bitwise: the world size, and so every reduction's order, is the same in every attempt.

    At a strict site: two policies, each of which alone used to lose the run. JobRequeue=0 refuses `scontrol
    requeue` of jobs that did not ask for it (hpcml's scripts ask), and PreemptMode=CANCEL would end the
    preempted job (rank 0 requeues it inside the grace time). Other cluster tests preempt under the default
    PreemptMode=REQUEUE."""
    rng = random.Random(3)
    kinds = rng.sample(["scontrol_requeue", "scancel_term", "preemption"], k=3)
    at = sorted(rng.sample(range(30, 170, 10), k=len(kinds)))
    out = new_out("every-kind")
    # Held at each interrupt's step until its signal comes: a starved Slurm may deliver it late.
    held = f"fault.hold_for_signal_at_steps=[{','.join(map(str, at))}]"
    with site_policy("--job-requeue", "0", "--batch-preempt-mode", "CANCEL"):
        proc = submit(out, *USER_RUN, *SLOW, held)
        job = job_id_of(out)
        for n, (step, kind) in enumerate(zip(at, kinds, strict=True)):
            wait_for_log(out, job, f"holding at step {step} until a signal comes")
            interrupt(kind, job)
            wait_until_resumed(out, job, n + 1)
        finish(proc)
    result = read_result(out)
    assert result["params_sha256"] == read_result(references["user"])["params_sha256"] and result["grad_sync"] == "fsdp"
    # BatchNorm's running statistics too: rank 0's, saved and restored by every attempt.
    expected = torch.load(references["user"] / "model.pt", weights_only=True)
    got = torch.load(out / "model.pt", weights_only=True)
    statistics = [name for name in expected if "running" in name]
    assert statistics and all(torch.equal(got[name], expected[name]) for name in statistics)
    assert result["resumed_from_step"] is not None and set(result["metrics"]) == {"val_mse"}
    log = rank0_log(out, job)
    assert all(f"stopping at step {step} (signal)" in log for step in at), log[-3000:]
    assert_a_restart_per_interrupt(attempts(job), log, len(kinds), STEPS)
    # Every attempt trained with its garbage collected at step boundaries (the default).
    assert log.count("garbage collected every 50 steps, by every rank at the same step") == len(attempts(job))
    # And rank 0 said its freed host memory went back to the OS: the default for FSDP on CPUs.
    returned = "freed host memory returns to the OS at once: blocks of 128 KiB or more are unmapped when freed"
    assert log.count(f"{returned} (train.freed_host_memory=auto;") == len(attempts(job))


def wait_for_idle_cluster(timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while subprocess.run(["squeue", "-h"], capture_output=True, text=True, check=True).stdout.strip():
        assert time.monotonic() < deadline, "the cluster never became idle"
        time.sleep(1)


def rank_pids(
    job: str, node: str, command: bytes = b"hpcml.compute.submitit_main", rank_variable: str = "SLURM_STEP_ID"
) -> list[int]:
    """The processes of `job`'s ranks on `node`, and their DataLoader workers (every logical node of the local
    cluster is this machine): those running `command` with `rank_variable` set (srun's ranks are job steps;
    mpirun's have a rank of Open MPI's, which mpirun itself, running the same command line, lacks)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if command not in (proc / "cmdline").read_bytes():
                continue
            pairs = (proc / "environ").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        env = dict(pair.split("=", 1) for pair in pairs if "=" in pair)
        if env.get("SLURM_JOB_ID") == job and env.get("SLURMD_NODENAME") == node and rank_variable in env:
            pids.append(int(proc.name))
    return pids


MIGRATION_RUN = [*USE, "+data.train.noise=0.3", "loader.num_workers=2", "train.grad_sync=fsdp", "train.steps=120"]


def test_an_elastic_sharded_job_that_loses_a_node_comes_back_on_the_other_with_the_same_stream():
    """Elastic requeue and job migration, two jobs at once, one per lost node: rank 0's (n1, where the batch
    shell runs) and the other (n2). cluster.min_nodes=1 (`--nodes=1-2`): a user's FSDP run on 2 nodes x 2
    ranks, on a Dataset that draws torch and numpy noise in __getitem__ read by two DataLoader workers per
    rank. kill -9 of both ranks on the lost node and their workers: what a node crash looks like from inside.
    The batch shell reads srun's report of which node's ranks were killed, requeues the job and excludes that
    node; Slurm restarts it on the one node left (a job whose batch script fixed its tasks per node would
    never fit there), it reshards its last checkpoint to 2 ranks and ends where the same run uninterrupted on
    4 ranks does, to float tolerance (the reduction order differs). A worker seeded from process state, or a
    sampler that split the stream by world size, would not. `hpcml status` shows each attempt's node count and
    the lost node. (An exception in one rank's code still fails the job at once, no retry:
    test_train_on_cluster.py.)"""
    outs = {"n1": new_out("migrate-rank0s-node"), "n2": new_out("migrate-other-node")}
    wait_for_idle_cluster()  # so that each job's first attempt gets both nodes
    together(
        rank_0s_node=partial(lose_a_node, outs["n1"], "n1", "n2"),
        another_node=partial(lose_a_node, outs["n2"], "n2", "n1"),
    )
    reference = new_out("migrate-reference")
    finish(submit(reference, *MIGRATION_RUN))
    assert read_result(reference)["world_size"] == 4
    expected = torch.load(reference / "model.pt", weights_only=True)
    for lost, out in outs.items():
        got = torch.load(out / "model.pt", weights_only=True)
        for name, value in expected.items():
            torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-5, msg=f"lost {lost}: {name} differs")


def lose_a_node(out, lost: str, kept: str) -> None:
    """Kill every process of the job on node `lost` past its step-30 checkpoint; it must finish on `kept`."""
    proc = submit(out, *MIGRATION_RUN, "cluster.min_nodes=1", "fault.step_sleep_s=0.1", "checkpoint.every_steps=30")
    job = job_id_of(out)
    wait_for_step(out, 40)  # past the step-30 checkpoint
    pids = rank_pids(job, lost)  # its 2 ranks and their DataLoader workers: all of them, as a crash would
    assert len(pids) >= 2, pids
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    finish(proc)
    result = read_result(out)
    assert (result["world_size"], result["num_nodes"]) == (2, 1) and result["resumed_from_step"] >= 30
    record = json.loads((out / "slurm_job.json").read_text())
    history = attempts(job)
    log = rank0_log(out, job)
    # One restart, the migration; any more were stops on a signal no test sent, on a starved machine (see
    # helpers.assert_a_restart_per_interrupt), each at a saved checkpoint, on the one node left.
    extra = len(history) - 2
    assert history[-1] == "COMPLETED" and extra >= 0, history
    assert log.count("stopped (signal) at a saved checkpoint") == extra, log[-3000:]
    assert record["lost_nodes"] == [lost] and record["nodes"] == kept
    assert record["attempt_nodes"] == [2, 1] + [1] * extra, record
    # srun reports ranks killed together on one line ("n2: tasks 2-3: Killed") and ranks whose deaths it saw
    # apart on one each ("n2: task 2: Killed"), as it did on a loaded machine. Only the step that lost the node
    # counts: a rank that crashed at start-up has srun kill the others in a step the batch shell relaunches.
    lost_step = log[: log.index(f"lost the ranks on {lost}")].rsplit("(start-up retry", 1)[-1]
    killed = set(re.findall(rf"srun: error: {lost}: tasks? ([0-9-]+): Killed", lost_step))
    expected = ({"0-1"}, {"0", "1"}) if lost == "n1" else ({"2-3"}, {"2", "3"})
    assert killed in expected, killed
    assert f"lost the ranks on {lost}" in log
    assert "written by 4 ranks, sharded, now 2)" in log
    status = subprocess.run(
        [PYTHON, "-m", "hpcml.login.cli", "status", str(out)], cwd=ROOT, capture_output=True, text=True
    )
    header, row = status.stdout.splitlines()[:2]
    shown = ",".join(map(str, record["attempt_nodes"]))
    assert row[header.index("nodes") :].split()[:2] == [shown, lost], status.stdout


def test_an_mpirun_job_that_loses_rank_0s_node_requeues_itself_without_it_and_finishes_on_the_other():
    """`sbatch --nodes=1-2 sbatch/train.sbatch` (the mpirun path) with HPCML_MIN_NODES=1, 2 nodes x 2 ranks:
    kill -9 of both ranks on rank 0's node (n1, where the batch shell and mpirun run), past the step-30
    checkpoint. The batch shell reads mpirun's report of the first rank to die from its copy of mpirun's
    stderr, requeues the job and excludes n1; it comes back on n2 alone, 2 ranks, from its last checkpoint,
    and completes. (Exactness at the new world size is the srun-path test's, above: the same resume.)"""
    wait_for_idle_cluster()  # so that the first attempt gets both nodes
    job = sbatch_train(
        "--nodes=1-2",
        "sbatch/train.sbatch",
        "train.steps=120",
        "fault.step_sleep_s=0.1",
        "checkpoint.every_steps=30",
        SAME_TRANSPORT,
        env={"HPCML_MIN_NODES": "1"},
    )
    run_dir = ROOT / "outputs" / "runs" / f"sbatch-{job}"
    wait_for_step(run_dir, 40)
    pids = rank_pids(job, "n1", command=b"jobs/train.py", rank_variable="OMPI_COMM_WORLD_RANK")
    assert len(pids) == 2, pids  # ranks 0 and 1 (the built-in data needs no workers)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    history = wait_until_ended(job)
    log = (ROOT / "outputs" / f"slurm-{job}.out").read_text()
    # One restart, the migration; any more were stops on a signal no test sent (see the every-kind test).
    assert history[-1] == "COMPLETED" and len(history) >= 2, f"{history}\n{log[-3000:]}"
    assert log.count("(signal): saving a checkpoint") == 2 * (len(history) - 2), log[-3000:]  # 2 ranks log it
    assert re.search(r"^mpirun noticed that process rank [01] with PID \d+ on node n1 exited on signal 9", log, re.M)
    assert "lost the ranks on n1" in log and "migration 1 of 3" in log
    result = read_result(run_dir)
    assert (result["world_size"], result["num_nodes"]) == (2, 1) and result["resumed_from_step"] >= 30, result
    record = json.loads((run_dir / "slurm_job.json").read_text())
    assert record["lost_nodes"] == ["n1"] and record["nodes"] == "n2", record


def test_time_limits_are_met_by_the_deadline_alone_on_srun_and_by_the_trapped_signal_on_mpirun(reference_sha):
    """Two jobs at once (a time limit is minutes of Slurm's clock, not of CPU): the two functions below."""
    together(
        srun_with_no_warning_signal=partial(deadline_saves_on_its_own_clock_and_requeues, reference_sha),
        mpirun_with_a_warning_signal=partial(mpirun_trap_passes_the_time_limit_signal_on, reference_sha),
    )


def deadline_saves_on_its_own_clock_and_requeues(reference_sha):
    """A 1-minute limit and `preempt.signal_lead_s=0`, so no `--signal` at all: rank 0's deadline alone must
    stop, save and requeue before Slurm kills the job, as often as it takes to finish."""
    out = new_out("deadline")
    proc = submit(
        out,
        f"train.steps={STEPS}",
        # 60 s of sleep alone: more than a 1-minute attempt can do, however fast it starts (with half of it a
        # quick start once finished inside the first attempt's deadline).
        "fault.step_sleep_s=0.3",
        "cluster.time_min=1",
        "preempt.signal_lead_s=0",
        "preempt.deadline_margin_s=5",
    )
    job = job_id_of(out)
    finish(proc, timeout=600)
    assert "--signal" not in next((out / "slurm").glob("*_submission.sh")).read_text()
    result = read_result(out)
    assert result["params_sha256"] == reference_sha and result["replicas_identical"]
    history = attempts(job)
    assert len(history) >= 2 and history[-1] == "COMPLETED", history
    assert "TIMEOUT" not in history  # it always stopped itself before Slurm killed it
    log = rank0_log(out, job)
    stops = stops_by_attempt(log)
    assert len(stops) == len(history) and all(stops[:-1]) and stops[-1] is None, f"{history}\n{log[-3000:]}"
    assert "deadline" in [reason for reason, _ in stops[:-1]], stops
    # Slurm's own TERM at the limit comes 60 s into an attempt, after the deadline's stop. A stop on a signal
    # well before that is allowed: a signal that a starved slurmd resent to a new attempt (as the every-kind
    # test allows; seen 11 s into attempt 3 in CI).
    into_attempt = [
        (reason, (at - started) % 86400)
        for (reason, at), started in zip(stops[:-1], attempt_starts(job)[:-1], strict=True)
    ]
    assert all(reason == "deadline" or seconds < 45 for reason, seconds in into_attempt), into_attempt
    assert_nothing_lost(log, STEPS, attempts=len(history))


def seconds_of_day(clock: str) -> int:
    hours, minutes, seconds = map(int, clock.split(":"))
    return 3600 * hours + 60 * minutes + seconds


def attempt_starts(job: str) -> list[int]:
    """When each attempt of `job` started (sacct), in seconds of the day, oldest first."""
    out = subprocess.run(
        ["sacct", "-X", "-D", "-n", "-P", "-j", job, "-o", "Start"], capture_output=True, text=True, check=True
    ).stdout
    assert all("T" in start for start in out.split()), out  # every attempt started
    return [seconds_of_day(start.split("T")[1]) for start in out.split()]


def stops_by_attempt(log: str) -> list[tuple[str, int] | None]:
    """Each attempt's stop in rank 0's log of a job (every attempt's lines): its reason and its time (seconds of
    the day), or None for an attempt that did not stop."""
    stops: list[tuple[str, int] | None] = []
    for line in log.splitlines():
        if not line.startswith("[rank 0] "):
            continue
        if re.search(r" INFO hpcml: rank 0/\d+ on node ", line):
            stops.append(None)
        elif stopped := re.search(r"stopping at step \d+ \((\w+)\): saving a checkpoint", line):
            assert stops and stops[-1] is None, f"two stops in one attempt: {line}"
            stops[-1] = (stopped.group(1), seconds_of_day(line.split()[2]))
    return stops


def test_kill_9_during_a_save_keeps_the_previous_checkpoint_in_both_layouts(references):
    """Replicated (DDP): rank 0, the writer, dies mid-write. Sharded (FSDP): rank 3, on the second node, dies
    with its shard cut in half, after writing it and before the commit, while the others wait for it. Two
    jobs at once."""
    together(
        replicated=partial(kill_9_during_a_save, "replicated", references),
        sharded=partial(kill_9_during_a_save, "sharded", references),
    )


def kill_9_during_a_save(layout, references):
    args, reference_out = ([], references["builtin"]) if layout == "replicated" else (USER_RUN, references["user"])
    killed_rank = 0 if layout == "replicated" else 3
    out = new_out(f"kill9-{layout}")
    proc = submit(
        out,
        *args,
        f"train.steps={STEPS}",
        "fault.step_sleep_s=0.02",
        "checkpoint.every_steps=50",
        "fault.kill_during_save_at_step=150",
        f"fault.rank={killed_rank}",
    )
    job = job_id_of(out)
    # The rank killed mid-save fails the attempt; Slurm does not requeue a failed job by itself, so we
    # do what a user (or `hpcml resume`) does: submit the same config again. It must resume from step-100.
    out_text, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert attempts(job)[-1] == "FAILED"
    killed = "rank 0 in the middle of a save" if layout == "replicated" else "rank 3 in the middle of a sharded save"
    said = (out / "slurm" / f"{job}_{killed_rank}_log.err").read_text()
    assert f"fault.kill_during_save_at_step=150: killing {killed}" in said
    assert (out / "checkpoints" / ".step-150.partial").exists()
    assert not (out / "checkpoints" / ".step-150.partial" / "manifest.json").exists()
    finish(submit(out, *args, f"train.steps={STEPS}"))
    result = read_result(out)
    assert result["resumed_from_step"] == 100
    assert result["params_sha256"] == read_result(reference_out)["params_sha256"]
    assert not (out / "checkpoints" / ".step-150.partial").exists()  # cleaned up by the next commit


def test_the_requeue_cap_and_a_start_up_crash_are_counted_and_shown_two_jobs_at_once(out_dir):
    """Two jobs at once, neither preempted (a preemption would take the other's nodes too): the requeue cap
    below, and a start-up crash relaunched inside its allocation (test_startup_faults.py)."""
    from test_startup_faults import start_up_crash_is_relaunched_counted_and_shown

    together(
        requeue_cap=requeue_cap_fails_the_job_with_a_visible_reason,
        start_up_crash=partial(start_up_crash_is_relaunched_counted_and_shown, out_dir),
    )


def requeue_cap_fails_the_job_with_a_visible_reason():
    """preempt.max_requeues=1 and two TERMs: the second attempt fails the job with the reason in sacct and its log."""
    out = new_out("cap")
    proc = submit(out, *SLOW, "preempt.max_requeues=1")
    job = job_id_of(out)
    for n in range(2):
        wait_for_step(out, 60 + 60 * n)
        subprocess.run(["scancel", "--signal=TERM", job], check=True)
        if n == 0:
            deadline = time.monotonic() + 120
            while attempts(job)[-1:] != ["RUNNING"] or len(attempts(job)) < 2:
                assert time.monotonic() < deadline, attempts(job)
                time.sleep(0.5)
    out_text, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "failed" in err
    assert attempts(job) == ["REQUEUED", "FAILED"]
    row = subprocess.run(
        ["sacct", "-X", "-n", "-P", "-j", job, "-o", "ExitCode,Comment"], capture_output=True, text=True
    ).stdout
    assert row.strip().startswith("5:0|hpcml: requeue cap reached (1 restarts, preempt.max_requeues=1)"), row
    log = (out / "slurm" / f"{job}_0_log.err").read_text()
    assert re.search(r"requeue cap reached .* the job fails here", log)


def sbatch_train(*args: str, env: dict[str, str] | None = None) -> str:
    """`sbatch [ARGS] sbatch/train.sbatch [overrides]` (the mpirun path), with `env` added to what the job
    inherits; returns the job id."""
    environ = {**os.environ, **(env or {})}
    done = subprocess.run(["sbatch", *args], cwd=ROOT, capture_output=True, text=True, check=True, env=environ)
    return re.search(r"Submitted batch job (\d+)", done.stdout).group(1)


def wait_until_ended(job: str, timeout: float = 480) -> list[str]:
    deadline = time.monotonic() + timeout
    while not attempts(job) or attempts(job)[-1] not in ("COMPLETED", "FAILED", "TIMEOUT", "CANCELLED"):
        assert time.monotonic() < deadline, attempts(job)
        time.sleep(1)
    return attempts(job)


def mpirun_trap_passes_the_time_limit_signal_on(reference_sha):
    """Under mpirun the ranks are not Slurm steps: the batch shell's trap must pass the warning on."""
    # Slurm sends the warning at the first of its 30-s checks that finds at most lead + 30 s left: with
    # --time=1 and @25 that is 5-35 s into every attempt, and an attempt slowed by a loaded machine could
    # spend all of it starting up and never get far (measured: 20 attempts of one step each). With --time=2
    # and @55 it comes 35-65 s in: every attempt trains for 15 s or more first.
    job = sbatch_train(
        "--time=2",
        "--signal=B:USR2@55",
        "sbatch/train.sbatch",
        f"train.steps={STEPS}",
        # About 70 s of work: more than the first attempt can do before the warning (35-65 s in), in every case.
        "fault.step_sleep_s=0.35",
        "preempt.deadline_margin_s=0",
        SAME_TRANSPORT,
    )
    history = wait_until_ended(job)
    log = (ROOT / "outputs" / f"slurm-{job}.out").read_text()
    assert history[-1] == "COMPLETED" and len(history) >= 2, f"{history}\n{log[-3000:]}"
    assert "(signal): saving a checkpoint" in log
    result = read_result(ROOT / "outputs" / "runs" / f"sbatch-{job}")
    assert result["launcher"] == "Open MPI (mpirun)" and result["params_sha256"] == reference_sha
    assert result["replicas_identical"]
    assert_nothing_lost(log, STEPS, attempts=len(history))


# A TERM that reaches the batch shell, not only the ranks: `--full` signals the shell's process group,
# `--batch` the shell alone. Without hpcml's batch shell (hpcml/compute/batch_shell.sh) the shell died at
# once and Slurm killed the step: the job ended FAILED and never came back.
BATCH_SHELL_TERMS = {"full": ["--full"], "batch": ["--batch"]}


def term_the_batch_shell(job: str, how: str) -> None:
    subprocess.run(["scancel", "--signal=TERM", *BATCH_SHELL_TERMS[how], job], check=True)


def wait_until_ranks_started(job: str, out, ranks: int = 4, timeout: float = 60) -> None:
    """Until every rank's Python runs (submitit logs "Loading pickle"): it then imports torch for seconds."""
    deadline = time.monotonic() + timeout
    logs = [out / "slurm" / f"{job}_{rank}_log.out" for rank in range(ranks)]
    while not all(log.exists() and "Loading pickle" in log.read_text() for log in logs):
        assert time.monotonic() < deadline, "the ranks never started"
        time.sleep(0.05)


def test_term_to_the_batch_shell_at_start_up_and_mid_training_is_survived_on_both_launch_paths(reference_sha):
    """The srun path (`hpcml` submits) and the mpirun path (`sbatch sbatch/train.sbatch`), two jobs at once:
    the two functions below."""
    together(
        srun_path=partial(term_to_the_batch_shell_on_the_srun_path, reference_sha),
        mpirun_path=partial(term_to_the_batch_shell_on_the_mpirun_path, reference_sha),
    )


def term_to_the_batch_shell_on_the_srun_path(reference_sha):
    """Two TERMs to one run's batch shell: `--batch` (the shell alone) while the ranks are still importing,
    before they formed their world; then, once the restart has resumed, `--full` (the shell's whole
    process group: srun too, were it not in its own session) in the middle of training."""
    out = new_out("shell-srun")
    proc = submit(out, *SLOW)
    job = job_id_of(out)
    wait_until_ranks_started(job, out)
    term_the_batch_shell(job, "batch")
    assert not (out / "slurm_job.json").exists()  # rank 0 writes it once the world has formed
    wait_until_resumed(out, job, 1, timeout=120)
    wait_for_step(out, 150)
    term_the_batch_shell(job, "full")
    finish(proc)
    result = read_result(out)
    assert result["params_sha256"] == reference_sha and result["replicas_identical"]
    log = rank0_log(out, job)
    assert "stopping at step 1 (signal): saving a checkpoint" in log
    assert_a_restart_per_interrupt(attempts(job), log, 2, STEPS)


def term_to_the_batch_shell_on_the_mpirun_path(reference_sha):
    """`sbatch sbatch/train.sbatch` by hand, as the README runs it (the mpirun path, 2 nodes x 2 ranks), gets
    two TERMs to its batch shell's process group: one while rank 0's Python has composed its config but the
    ranks have not formed their world, one in the middle of training after the restart resumed."""
    job = sbatch_train("sbatch/train.sbatch", *SLOW, SAME_TRANSPORT)
    run_dir = ROOT / "outputs" / "runs" / f"sbatch-{job}"
    slurm_log = ROOT / "outputs" / f"slurm-{job}.out"
    # Rank 0 has composed its config (Hydra wrote .hydra/), so its Python runs; torch is not imported yet.
    deadline = time.monotonic() + 60
    while not (run_dir / ".hydra").is_dir():
        assert time.monotonic() < deadline, attempts(job)
        time.sleep(0.05)
    time.sleep(0.3)  # the other node's ranks start a moment later
    term_the_batch_shell(job, "full")
    assert not (run_dir / "slurm_job.json").exists()  # rank 0 writes it once the world has formed
    deadline = time.monotonic() + 120
    while not slurm_log.exists() or slurm_log.read_text().count("resumed from") < 1:
        assert time.monotonic() < deadline, attempts(job)
        time.sleep(0.5)
    wait_for_step(run_dir, 150)
    term_the_batch_shell(job, "full")
    history = wait_until_ended(job)
    log = slurm_log.read_text()
    assert_a_restart_per_interrupt(history, log, 2, STEPS)
    # The log holds every rank's lines: each stop was made at one step by all four.
    stops = [re.findall(rf"\[rank {rank}\] .*stopping at step (\d+) \(signal\)", log) for rank in range(4)]
    assert all(s == stops[0] for s in stops), stops
    result = read_result(run_dir)
    assert result["launcher"] == "Open MPI (mpirun)" and result["world_size"] == 4 and result["num_nodes"] == 2
    assert result["params_sha256"] == reference_sha and result["replicas_identical"]


def test_a_real_cancel_ends_the_job_cancelled_and_never_requeues_it():
    """`scancel <job>` with no signal option: the ranks still save what they can, and nothing comes back."""
    out = new_out("cancel")
    proc = submit(out, *SLOW, wait=False)
    finish(proc)
    job = job_id_of(out)
    wait_for_step(out, 60)
    subprocess.run(["scancel", job], check=True)
    # A requeued job would wait in the queue (PENDING, BeginTime) for 11 s: the job must leave it instead.
    deadline = time.monotonic() + 60
    while subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout.strip():
        assert time.monotonic() < deadline, attempts(job)
        time.sleep(0.5)
    time.sleep(2)  # a requeue that rank 0 sent while the job was completing would have reached the queue by now
    assert subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout.strip() == ""
    assert attempts(job) == ["CANCELLED"]
    log = (out / "slurm" / f"{job}_0_log.err").read_text()
    assert f"job {job} was cancelled: checkpoint saved, not requeued" in log
    assert list((out / "checkpoints").glob("step-*"))


def rank_pid(job: str, rank: int) -> int:
    """The pid of one rank's process (both logical nodes run on this machine); `job` may be `<array>_<index>`."""
    array, _, index = job.partition("_")
    wanted = {f"SLURM_PROCID={rank}".encode()}
    if index:
        wanted |= {f"SLURM_ARRAY_JOB_ID={array}".encode(), f"SLURM_ARRAY_TASK_ID={index}".encode()}
    else:
        wanted.add(f"SLURM_JOB_ID={job}".encode())
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if b"hpcml.compute.submitit_main" not in cmdline.read_bytes():
                continue
            env = set((cmdline.parent / "environ").read_bytes().split(b"\0"))
        except OSError:
            continue
        if wanted <= env:
            return int(cmdline.parent.name)
    raise AssertionError(f"no process of rank {rank} of job {job}")


def test_a_preempted_array_task_and_one_rank_hearing_a_signal_both_resume_exactly(reference_sha):
    """A sweep's trial is an array task. Preempted by a job in the urgent partition, it is requeued by its
    rank 0 (by its own `<array>_<index>` id) and resumes. Then TERM reaches rank 2 alone (on the second
    node): all four ranks agree on one step, save it once, rank 0 requeues, and the run ends as the same run
    uninterrupted."""
    from hpcml.login.sweep import TERMINAL_STATES, load_sweep, sweep_status

    base = new_out("array-preempt")
    # Held at step 80 until the preemption's signal comes: a starved Slurm may deliver it after the run's end.
    held = "fault.hold_for_signal_at_steps=[80]"
    cmd = [PYTHON, TRAIN, "-m", "cluster=local", f"hydra.sweep.dir={base}", SAME_TRANSPORT, *SLOW, held, "train.seed=0"]
    done = subprocess.run(cmd, cwd=ROOT, env=mpi_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    sweep = load_sweep(base)
    trial, job = base / sweep.trials[0].dir, sweep.trials[0].job_id
    wait_for_log(base, job, "holding at step 80 until a signal comes")
    interrupt("preemption", job)
    rank_log = [base / "slurm" / f"{job}_{rank}_log.err" for rank in range(4)]
    wait_until_resumed(base, job, 1)
    wait_for_step(trial, 140)
    os.kill(rank_pid(job, 2), signal.SIGTERM)
    deadline = time.monotonic() + 300
    while (row := sweep_status(sweep)[0]).state not in TERMINAL_STATES:
        assert time.monotonic() < deadline, row
        time.sleep(1)
    assert row.state == "COMPLETED", row
    result = read_result(trial)
    assert result["params_sha256"] == reference_sha and result["replicas_identical"]
    log, history = rank_log[0].read_text(), attempts(job)
    assert_a_restart_per_interrupt(history, log, 2, STEPS)
    assert row.restarts == len(history) - 1, (row, history)  # as `hpcml status` counts them
    stops = [re.findall(r"stopping at step (\d+) \(signal\)", path.read_text()) for path in rank_log]
    assert all(s == stops[0] for s in stops), stops  # each stop at one step on every rank
    assert stops[0][0] == "80", stops  # the preemption's
    assert all(log.count(f"checkpoint step-{step} committed") == 1 for step in stops[0]), stops  # saved once each
