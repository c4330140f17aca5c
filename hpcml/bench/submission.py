"""Sweep submission from the login node: wall time for `jobs/train.py -m` over N trials, and baselines.

All three submit one Slurm job array of N tasks (at most one running) to the cluster from `make
cluster-up`, are timed from process start to exit (what the user's shell waits for), and are cancelled
at once:
- hpcml: `python jobs/train.py -m train.seed=range(0,N) cluster=local` (Hydra composes and validates
  every trial, writes each trial's folder, renders one array script, submits it through submitit);
- submitit: a script calling `SlurmExecutor.map_array` on N trivial calls (pickles one job per task);
- sbatch: `sbatch --array=0-(N-1)%1 --wrap=true`, Slurm's own floor.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from hpcml.bench.launch import BenchmarkError, cluster_is_up, worker_env
from hpcml.bench.record import BenchResult, Figure

ROOT = Path(__file__).resolve().parents[2]
SUBMITIT_SCRIPT = """
import sys, submitit
executor = submitit.SlurmExecutor(folder=sys.argv[1])
executor.update_parameters(time=1, nodes=1, ntasks_per_node=1, array_parallelism=1)
jobs = executor.map_array(abs, range(int(sys.argv[2])))
print(jobs[0].job_id.split("_")[0])
"""


def _run(cmd: list[str]) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=worker_env(), capture_output=True, text=True, timeout=900)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise BenchmarkError(f"`{' '.join(cmd[:6])} ...` exited {done.returncode}:\n{done.stderr[-3000:]}")
    return elapsed, done.stdout


def _cancel(array_ids: set[str]) -> None:
    if array_ids:
        subprocess.run(["scancel", *sorted(array_ids)], capture_output=True, timeout=120)


def hpcml_sweep(trials: int, sweep_dir: Path) -> float:
    cmd = [
        sys.executable,
        str(ROOT / "jobs" / "train.py"),
        "-m",
        f"train.seed=range(0,{trials})",
        "cluster=local",
        "launch.array_parallelism=1",
        f"hydra.sweep.dir={sweep_dir}",
    ]
    try:
        elapsed, _ = _run(cmd)
    finally:
        record = sweep_dir / "sweep.json"
        if record.is_file():
            jobs = {t["job_id"].split("_")[0] for t in json.loads(record.read_text())["trials"] if t.get("job_id")}
            _cancel(jobs)
    submitted = sum(1 for t in json.loads(record.read_text())["trials"] if t.get("job_id"))
    if submitted != trials:
        raise BenchmarkError(f"the sweep submitted {submitted} of {trials} trials")
    return elapsed


def submitit_map_array(trials: int, folder: Path) -> float:
    elapsed, out = _run([sys.executable, "-c", SUBMITIT_SCRIPT, str(folder), str(trials)])
    _cancel({out.strip().splitlines()[-1]})
    return elapsed


def sbatch_array(trials: int, folder: Path) -> float:
    folder.mkdir(parents=True, exist_ok=True)
    cmd = ["sbatch", "--parsable", f"--array=0-{trials - 1}%1", f"--output={folder}/%A_%a.out", "--wrap=true"]
    elapsed, out = _run(cmd)
    _cancel({out.strip().split(";")[0]})
    return elapsed


def run(quick: bool, workdir: Path) -> BenchResult:
    trials, repeats = (100, 1) if quick else (1000, 1)
    result = BenchResult("submission", quick, {"trials": trials, "repeats": repeats})
    if not cluster_is_up():
        raise BenchmarkError("no Slurm cluster answers; start one with `make cluster-up`")
    scratch = workdir / "outputs" / "bench-submission"
    shutil.rmtree(scratch, ignore_errors=True)
    rounds: dict[str, list[float]] = {k: [] for k in ("hpcml", "submitit", "sbatch")}
    try:
        for i in range(repeats):
            rounds["sbatch"].append(sbatch_array(trials, scratch / f"sbatch-{i}"))
            rounds["submitit"].append(submitit_map_array(trials, scratch / f"submitit-{i}"))
            rounds["hpcml"].append(hpcml_sweep(trials, scratch / f"hpcml-{i}"))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result.measurements.append(
        {**{f"{k}_s": statistics.median(v) for k, v in rounds.items()}, "rounds_s": rounds, "trials": trials}
    )
    for baseline in ("submitit", "sbatch"):
        name = "submitit map_array" if baseline == "submitit" else "one sbatch --array"
        result.figures.append(
            Figure.from_rounds("submission", f"submit a {trials}-trial sweep", "s", rounds["hpcml"], name,
                               rounds[baseline], higher_is_better=False)
        )  # fmt: skip
    return result
