"""A study (hydra/sweeper=study) on the real local cluster: a prompt return, a driver job that survives a
requeue and a preemption, pruned trials that leave early and free their nodes, the report and its best.yaml,
and a database storage."""

import json
import re
import subprocess
import time
import uuid

import optuna
from cluster_jobs import interrupt
from helpers import PYTHON, ROOT, TRAIN, attempts, mpi_env

from hpcml.localcluster.cluster import LocalClusterLayout
from hpcml.login import slurm
from hpcml.login.tune.study import StudySpec, load_trials
from hpcml.login.tune.submit import driver_job_id

TRIAL_STEPS = 120


def submit_study(base, *args) -> tuple[subprocess.CompletedProcess, float]:
    cmd = [PYTHON, TRAIN, "-m", "cluster=local", "hydra/sweeper=study", f"hydra.sweep.dir={base}", *args]
    started = time.monotonic()
    done = subprocess.run(cmd, cwd=ROOT, env=mpi_env(), capture_output=True, text=True, timeout=120)
    return done, time.monotonic() - started


def hpcml(*args, stream: str = "stdout") -> str:
    cmd = [PYTHON, "-m", "hpcml.login.cli", *args]
    done = subprocess.run(cmd, cwd=ROOT, env=mpi_env(), capture_output=True, text=True, timeout=120)
    return getattr(done, stream)


def jobs_per_trial(base, trials) -> dict[int, set[str]]:
    """Trial number -> every Slurm job id accounting knows under the trial's job name."""
    spec = StudySpec.load(base)
    names = {spec.job_name(t.num): t.num for t in trials}
    cmd = ["sacct", "-X", "-n", "-P", "--name", ",".join(names), "-o", "JobName,JobID"]
    found: dict[int, set[str]] = {num: set() for num in names.values()}
    for line in subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split():
        name, job_id = line.split("|")
        found[names[name]].add(job_id)
    return found


def squeue(job: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout.strip()


def wait_until(condition, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.5)


def test_a_64_trial_study_is_submitted_in_seconds_by_a_driver_job():
    base = ROOT / "outputs" / "test-runs" / f"study-big-{time.time_ns()}"
    done, seconds = submit_study(
        base, "hydra.sweeper.direction=maximize", "hydra.sweeper.n_trials=64", "optim.lr=0.01,0.1"
    )
    assert done.returncode == 0, done.stderr
    driver = driver_job_id(base)
    assert slurm.cancel_named(StudySpec.load(base).driver_job_name)  # the study itself is the next test's
    assert seconds < 5, seconds
    assert f"driver:    Slurm job {driver}" in done.stdout and f"hpcml status {base} --watch" in done.stdout
    script = (base / "driver" / "driver.sbatch").read_text()
    assert "-m hpcml.login.tune.driver" in script and "#SBATCH --cpus-per-task=1" in script


def test_a_pruning_study_survives_its_driver_being_requeued_and_preempted():
    """12 trials, 4 at a time, median pruner. Mid-study the driver is `scontrol requeue`d, then preempted by a
    job in the urgent partition that takes every CPU (trials are preempted too, and resume by themselves).
    The study ends with exactly 12 trials, each submitted once; pruned trials stopped early, COMPLETED."""
    base = ROOT / "outputs" / "test-runs" / f"study-{time.time_ns()}"
    done, _ = submit_study(
        base,
        "hydra.sweeper.direction=maximize",
        "hydra.sweeper.n_trials=12",
        "hydra.sweeper.max_parallel=4",
        "hydra.sweeper.sampler=random",
        "hydra.sweeper.seed=1",
        "hydra.sweeper.pruner=median",
        "+hydra.sweeper.pruner_args={n_startup_trials:2,n_warmup_steps:40}",
        "hydra.sweeper.poll_s=1",
        "cluster.nodes=1",
        "cluster.tasks_per_node=1",
        f"train.steps={TRIAL_STEPS}",
        "train.eval_every_steps=20",
        "fault.step_sleep_s=0.05",
        "optim.lr=tag(log,interval(1e-5,0.5))",
    )
    assert done.returncode == 0, done.stderr
    driver = driver_job_id(base)
    wait_until(lambda: len(load_trials(base)) >= 3, "the driver never submitted trials")
    subprocess.run(["scontrol", "requeue", driver], check=True)
    wait_until(lambda: attempts(driver)[-1:] == ["RUNNING"] and len(attempts(driver)) >= 2, "driver not back")
    wait_until(lambda: len(load_trials(base)) >= 6, "the requeued driver never went on")
    interrupt("preemption", driver)
    wait_until(lambda: len(attempts(driver)) >= 3, "the driver was not preempted")
    wait_until(lambda: attempts(driver)[-1] == "COMPLETED", f"the study never finished: {attempts(driver)}", 400)

    history = attempts(driver)
    assert history.count("REQUEUED") + history.count("PREEMPTED") >= 2, history
    trials = load_trials(base)
    assert [t.num for t in trials] == list(range(12)), [t.num for t in trials]
    jobs = jobs_per_trial(base, trials)
    for t in trials:  # one job per trial, unless it failed and was retried (then one per retry)
        assert len(jobs[t.num]) == 1 + t.retries, (t, jobs)
    assert all(t.outcome in ("complete", "pruned") for t in trials), [(t.num, t.outcome) for t in trials]
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(base / "optuna.journal")))
    frozen = optuna.load_study(study_name=StudySpec.load(base).name, storage=storage).trials
    assert len(frozen) == 12 and {t.state.name for t in frozen} <= {"COMPLETE", "PRUNED"}

    pruned = [t for t in trials if t.outcome == "pruned"]
    assert pruned, [(t.num, t.value) for t in trials]
    for t in pruned:
        state = attempts(t.job_id)
        assert state[-1] in ("COMPLETED", "CANCELLED"), (t, state)  # CANCELLED: pruned while waiting in the queue
        steps = [json.loads(line).get("step", 0) for line in (base / t.dir / "metrics.jsonl").read_text().splitlines()]
        assert max(steps) < TRIAL_STEPS and not (base / t.dir / "result.json").exists()  # stopped early
        if state[-1] == "COMPLETED":
            log = next((base / "slurm").glob(f"{t.job_id}_0_log.err")).read_text()
            assert re.search(r"stopped: pruned by study .* after step \d+; checkpoint saved, not requeued", log)
    status = hpcml("status", str(base))
    best = max((t for t in trials if t.outcome == "complete"), key=lambda t: t.value)
    assert f"best: trial {best.num}, test_accuracy={best.value:.6g}" in status, status
    assert status.count("PRUNED") == len(pruned), status

    # The report: Optuna's plots, and best.yaml, which reruns the best trial as one command (here, on this
    # machine; the trial's float sums ran with a different thread count, so equal to 1e-3, not bitwise).
    report = hpcml("report", str(base))
    assert f"best: trial {best.num}" in report, report
    for name in ("optimization_history", "intermediate_values", "param_importances"):
        assert (base / "report" / f"{name}.png").stat().st_size > 10_000, name
    rerun = ROOT / "outputs" / "test-runs" / f"{base.name}-best"
    cmd = [PYTHON, TRAIN, "--config-dir", str(base / "report"), "--config-name", "best", "cluster.submit=false"]
    cmd += ["fault.step_sleep_s=0", f"hydra.run.dir={rerun}"]
    done = subprocess.run(cmd, cwd=ROOT, env=mpi_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    again = json.loads((rerun / "result.json").read_text())["metrics"]["test_accuracy"]
    assert abs(again - best.value) < 1e-3, (again, best.value)


def test_a_study_kept_in_the_clusters_mariadb_is_cancelled_and_resumed(tmp_path):
    """hydra.sweeper.storage: any Optuna storage URL; here the MariaDB the local cluster runs for slurmdbd.
    Its driver is cancelled after the first trial went out; `hpcml resume` submits a new one, which finds
    that trial's job and finishes the study with each trial submitted once."""
    layout = LocalClusterLayout(ROOT / ".cluster")
    url = layout.optuna_storage_url
    name = f"db-study-{uuid.uuid4().hex[:8]}"
    base = ROOT / "outputs" / "test-runs" / name
    done, _ = submit_study(
        base,
        "hydra.sweeper.direction=maximize",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.max_parallel=1",
        "hydra.sweeper.poll_s=1",
        f"hydra.sweeper.storage={url}",
        f"hydra.sweeper.study_name={name}",
        "cluster.nodes=1",
        "cluster.tasks_per_node=1",
        "train.steps=20",
        "optim.lr=0.05,0.1",
    )
    assert done.returncode == 0, done.stderr
    first = driver_job_id(base)
    wait_until(lambda: any(t.job_id for t in load_trials(base)), "the driver never submitted a trial")
    assert "is running" in hpcml("resume", str(base), stream="stderr")  # refused: it carries on by itself
    subprocess.run(["scancel", first], check=True)
    # A TERM ends its loop after the current look; it leaves by itself once it has read that its job was
    # cancelled (at once, or when slurmdbd has recorded it: sacct lagged 15 s behind in CI). Killed after
    # Slurm's KillWait instead, it would not have logged that; requeueing its job would bring it back.
    wait_until(lambda: not squeue(first), f"the driver did not leave: {attempts(first)}", timeout=60)
    assert "the driver's job was cancelled: stopped" in (base / "driver" / f"{first}.log").read_text()
    wait_until(lambda: attempts(first) == ["CANCELLED"], f"not just cancelled: {attempts(first)}", timeout=60)
    assert "study driver resubmitted" in hpcml("resume", str(base))
    second = driver_job_id(base)
    assert second != first
    wait_until(lambda: attempts(second)[-1:] == ["COMPLETED"], f"the study never finished: {attempts(second)}")
    trials = load_trials(base)
    assert [t.outcome for t in trials] == ["complete"] * 3 and all(not t.previous_job_ids for t in trials)
    assert all(len(ids) == 1 for ids in jobs_per_trial(base, trials).values())  # each trial submitted once
    study = optuna.load_study(study_name=name, storage=url)
    assert sorted(t.state.name for t in study.trials) == ["COMPLETE"] * 3
    assert not (base / "optuna.journal").exists()
    unreachable = url.replace(str(layout.mariadb_port), "1")
    refused, _ = submit_study(
        tmp_path / "s", "hydra.sweeper.direction=maximize", f"hydra.sweeper.storage={unreachable}", "optim.lr=0.05,0.1"
    )
    assert refused.returncode != 0 and "cannot open it" in refused.stderr, refused.stderr
    assert not (tmp_path / "s").exists()
