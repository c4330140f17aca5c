"""Studies on the local cluster: what pruning saves, and what the login node spends.

- pruning: the same study twice at once (random sampler, one seed, so trial i has the same parameters in
  both; half the cluster's trial slots each), once pruned by asynchronous successive halving (ASHA, what
  Ray Tune users know) and once without a pruner. Node-seconds are every trial job's attempts from sacct
  (ElapsedRaw x NNodes), start-up included; the best objective is each study's best completed trial.
  Targets (issue #18): <= 0.5x the node-seconds, a best objective within 1%. In full mode a step sleeps
  20 ms (`fault.step_sleep_s`), so a whole trial lasts about a minute as a GPU-bound one would, without six
  trials fighting over two cores for compute; its start-up is what no pruner can save.
- login node: seconds from the command's start to its exit for a study of N trials (the driver does the
  rest on the cluster), against `sbatch --wrap=true`, Slurm's floor for submitting anything, and (full
  mode) against hydra-optuna-sweeper, which holds the shell until the last batch of trials has ended: it
  runs a short study of the shortest trials and its seconds per trial are scaled to N trials (an estimate:
  the command's own start-up, a few seconds, is scaled with them).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from hpcml.bench.launch import BenchmarkError, cluster_is_up, worker_env
from hpcml.bench.record import BenchResult, Figure
from hpcml.login.slurm import cancel_named
from hpcml.login.tune.study import StudySpec

ROOT = Path(__file__).resolve().parents[2]
TRAIN = ROOT / "jobs" / "train.py"


def submit_study(study_dir: Path, *args: str) -> float:
    cmd = [sys.executable, str(TRAIN), "-m", "cluster=local", "hydra/sweeper=study", f"hydra.sweep.dir={study_dir}"]
    started = time.perf_counter()
    done = subprocess.run([*cmd, *args], cwd=ROOT, env=worker_env(), capture_output=True, text=True, timeout=300)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise BenchmarkError(f"submitting the study in {study_dir} failed:\n{done.stderr[-3000:]}")
    return elapsed


def wait_for_driver(study_dir: Path, timeout_s: float) -> None:
    from hpcml.login.slurm import array_task_states
    from hpcml.login.tune.submit import driver_job_id

    job = driver_job_id(study_dir)
    deadline = time.monotonic() + timeout_s
    while (state := array_task_states([job]).get(job, ("UNKNOWN", ""))[0]) != "COMPLETED":
        if state in ("FAILED", "CANCELLED", "TIMEOUT") or time.monotonic() > deadline:
            subprocess.run(["scancel", job], capture_output=True)
            raise BenchmarkError(f"the study in {study_dir} did not finish ({state}); see {study_dir}/driver/")
        time.sleep(2)


def node_seconds(study_dir: Path) -> float:
    from hpcml.login.tune.study import StudySpec, load_trials

    spec = StudySpec.load(study_dir)
    names = ",".join(spec.job_name(t.num) for t in load_trials(study_dir))
    out = subprocess.run(
        ["sacct", "-X", "-D", "-n", "-P", "--name", names, "-S", "now-1days", "-o", "ElapsedRaw,NNodes"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return sum(int(elapsed) * int(nodes) for elapsed, nodes in (line.split("|") for line in out.split()))


def best_value(study_dir: Path) -> float:
    from hpcml.login.tune.study import COMPLETE, load_trials

    values = [t.value for t in load_trials(study_dir) if t.outcome == COMPLETE and t.value is not None]
    if not values:
        raise BenchmarkError(f"no trial of the study in {study_dir} completed")
    return max(values)


def sbatch_floor(folder: Path) -> float:
    folder.mkdir(parents=True, exist_ok=True)
    cmd = ["sbatch", "--parsable", f"--output={folder}/%j.out", "--wrap=true"]
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)
    elapsed = time.perf_counter() - started
    subprocess.run(["scancel", done.stdout.strip().split(";")[0]], capture_output=True)
    return elapsed


# hydra-optuna-sweeper pins optuna<3, and hpcml needs Optuna 4 or 5: the old path runs with both pinned in
# a folder of their own, put before the environment's packages on PYTHONPATH for that one command.
OLD_SWEEPER = ("optuna==2.10.1", "hydra-optuna-sweeper==1.3.0")
OLD_SWEEPER_DIR = ROOT / "bench" / "optuna2"


def old_sweeper_path() -> Path:
    # The folder says which versions it holds: one left by another pin, or by a broken install, is replaced.
    marker = OLD_SWEEPER_DIR / "hpcml-installed.txt"
    if not marker.is_file() or marker.read_text() != " ".join(OLD_SWEEPER):
        shutil.rmtree(OLD_SWEEPER_DIR, ignore_errors=True)
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--target",
            str(OLD_SWEEPER_DIR),
            *OLD_SWEEPER,
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise BenchmarkError(f"installing {' '.join(OLD_SWEEPER)} into {OLD_SWEEPER_DIR} failed:\n{done.stderr}")
        marker.write_text(" ".join(OLD_SWEEPER))
    return OLD_SWEEPER_DIR


def old_sweeper_seconds(sweep_dir: Path, trials: int, parallel: int) -> float:
    """Seconds hydra-optuna-sweeper holds the shell for a study of `trials` 40-step trials, `parallel` at once."""
    cmd = [sys.executable, str(TRAIN), "-m", "cluster=local", "hydra/sweeper=optuna", f"hydra.sweep.dir={sweep_dir}",
           "hydra.sweeper.direction=maximize", f"hydra.sweeper.n_trials={trials}", f"hydra.sweeper.n_jobs={parallel}",
           "hydra.sweeper.sampler.seed=0", "optim.lr=tag(log,interval(1e-5,0.5))", "train.steps=40",
           "cluster.nodes=1", "cluster.tasks_per_node=1"]  # fmt: skip
    env = worker_env()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(old_sweeper_path()), env.get("PYTHONPATH")]))
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    elapsed = time.perf_counter() - started
    if done.returncode != 0 or "Best value" not in done.stdout + done.stderr:
        raise BenchmarkError(f"the hydra-optuna-sweeper study in {sweep_dir} failed:\n{done.stderr[-3000:]}")
    return elapsed


def run(quick: bool, workdir: Path) -> BenchResult:
    # Quick: one wave of short trials per study; it proves the benchmark runs, its figures are not judged.
    trials, steps, step_sleep_s, big = (3, 40, 0.02, 64) if quick else (16, 2500, 0.02, 1000)
    old_trials, old_parallel = 6, 3
    params = {"trials": trials, "steps": steps, "step_sleep_s": step_sleep_s, "large_study_trials": big}
    result = BenchResult("tuning", quick, params)
    if not cluster_is_up():
        raise BenchmarkError("no Slurm cluster answers; start one with `make cluster-up`")
    scratch = workdir / "outputs" / "bench-tuning"
    shutil.rmtree(scratch, ignore_errors=True)
    eval_every = steps // 10
    common = [
        "hydra.sweeper.direction=maximize",
        f"hydra.sweeper.n_trials={trials}",
        "hydra.sweeper.max_parallel=3",
        "hydra.sweeper.sampler=random",
        "hydra.sweeper.seed=0",
        "hydra.sweeper.poll_s=1",
        "cluster.nodes=1",
        "cluster.tasks_per_node=1",
        f"train.steps={steps}",
        f"train.eval_every_steps={eval_every}",
        f"fault.step_sleep_s={step_sleep_s}",
        "optim.lr=tag(log,interval(1e-5,0.5))",
    ]
    # Rungs at the 1st, 3rd and 9th evaluation: a trial goes on past a rung only when it is in the best third
    # of the trials that reached that rung so far (Optuna's asynchronous successive halving).
    pruner = [
        "hydra.sweeper.pruner=successive_halving",
        f"+hydra.sweeper.pruner_args={{min_resource:{eval_every},reduction_factor:3}}",
    ]
    studies = {"pruned": scratch / "pruned", "unpruned": scratch / "unpruned"}
    try:
        submit_study(studies["pruned"], *common, *pruner)
        submit_study(studies["unpruned"], *common)
        for study_dir in studies.values():
            wait_for_driver(study_dir, timeout_s=1800)
        spent = {name: node_seconds(d) for name, d in studies.items()}
        best = {name: best_value(d) for name, d in studies.items()}
        # The login node's part of a large study: its size changes nothing the login node does.
        big_s = submit_study(scratch / "large", "hydra.sweeper.direction=maximize", f"hydra.sweeper.n_trials={big}",
                             "optim.lr=0.01,0.1")  # fmt: skip
        cancel_named(StudySpec.load(scratch / "large").driver_job_name)
        floor_s = sbatch_floor(scratch / "sbatch")
        old_s, old_error = None, None
        if not quick:
            try:
                old_s = old_sweeper_seconds(scratch / "optuna-sweeper", old_trials, old_parallel)
            except (BenchmarkError, subprocess.SubprocessError) as err:  # the studies' figures still stand
                old_error = str(err).splitlines()[0]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result.measurements.append(
        {"node_seconds": spent, "best": best, "submit_s": big_s, "sbatch_s": floor_s, "old_sweeper_s": old_s,
         "old_sweeper_trials": old_trials, "old_sweeper_parallel": old_parallel}
    )  # fmt: skip
    result.figures += [
        Figure.from_rounds("tuning", f"node-seconds of a {trials}-trial study, ASHA pruner", "node-s",
                           [spent["pruned"]], "no pruner", [spent["unpruned"]], higher_is_better=False, target=2.0),
        Figure.from_rounds("tuning", "best test_accuracy, ASHA pruner", "", [best["pruned"]], "no pruner",
                           [best["unpruned"]], higher_is_better=True, target=0.99),
        Figure.from_rounds("tuning", f"login-node seconds to submit a {big}-trial study", "s", [big_s],
                           "one sbatch --wrap=true", [floor_s], higher_is_better=False),
    ]  # fmt: skip
    if old_error:
        result.notes.append(f"hydra-optuna-sweeper not measured: {old_error}")
    elif old_s is None:
        result.notes.append(
            "quick mode: the hydra-optuna-sweeper comparison runs in full mode only (it installs Optuna 2.10)"
        )
    else:
        result.figures.append(
            Figure.from_rounds("tuning", f"login-node seconds held by a {big}-trial study", "s", [big_s],
                               f"hydra-optuna-sweeper, {old_trials} trials of 40 steps {old_parallel} at a time, "
                               f"scaled to {big} trials", [old_s * big / old_trials], higher_is_better=False)
        )  # fmt: skip
    return result
