"""Studies on the local cluster: what pruning saves, and what the login node spends.

- pruning: the same study twice at once (random sampler, one seed, so trial i has the same parameters in
  both; half the cluster's trial slots each), once with the median pruner and once without. Node-seconds
  are every trial job's attempts from sacct (ElapsedRaw x NNodes), the best objective is each study's best
  completed trial. Targets (issue #18): <= 0.5x the node-seconds, a best objective within 1%.
- login node: seconds from the command's start to its exit for a study of N trials (the driver does the
  rest on the cluster), against `sbatch --wrap=true`, Slurm's floor for submitting anything.
"""

from __future__ import annotations

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


def run(quick: bool, workdir: Path) -> BenchResult:
    # Quick: one wave of trials per study, too few for the pruner to act (it proves the benchmark runs).
    trials, steps, big = (3, 40, 64) if quick else (16, 300, 1000)
    result = BenchResult("tuning", quick, {"trials": trials, "steps": steps, "large_study_trials": big})
    if not cluster_is_up():
        raise BenchmarkError("no Slurm cluster answers; start one with `make cluster-up`")
    scratch = workdir / "outputs" / "bench-tuning"
    shutil.rmtree(scratch, ignore_errors=True)
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
        f"train.eval_every_steps={steps // 10}",
        "fault.step_sleep_s=0.02",
        "optim.lr=tag(log,interval(1e-5,0.5))",
    ]
    pruner = [
        "hydra.sweeper.pruner=median",
        f"+hydra.sweeper.pruner_args={{n_startup_trials:3,n_warmup_steps:{steps // 5}}}",
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
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result.measurements.append({"node_seconds": spent, "best": best, "submit_s": big_s, "sbatch_s": floor_s})
    result.figures += [
        Figure.from_rounds("tuning", f"node-seconds of a {trials}-trial study, median pruner", "node-s",
                           [spent["pruned"]], "no pruner", [spent["unpruned"]], higher_is_better=False, target=2.0),
        Figure.from_rounds("tuning", "best test_accuracy, median pruner", "", [best["pruned"]], "no pruner",
                           [best["unpruned"]], higher_is_better=True, target=0.99),
        Figure.from_rounds("tuning", f"login-node seconds to submit a {big}-trial study", "s", [big_s],
                           "one sbatch --wrap=true", [floor_s], higher_is_better=False),
    ]  # fmt: skip
    return result
