"""Dry runs ask the cluster (sinfo) to check partitions, so they live with the real-cluster tests."""

import subprocess

from helpers import PYTHON, ROOT, TRAIN, mpi_env


def run_sweep(*args):
    return subprocess.run(
        [PYTHON, TRAIN, "-m", *args], cwd=ROOT, env=mpi_env(), capture_output=True, text=True, timeout=120
    )


def test_dry_run_prints_one_array_script_and_submits_nothing(tmp_path):
    done = run_sweep(
        "cluster=local",
        "optim.lr=0.01,0.1",
        "model.width=32,64,128",
        "launch.dry_run=true",
        "launch.array_parallelism=2",
        f"hydra.sweep.dir={tmp_path}",
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("#!/bin/bash") == 1
    assert "#SBATCH --array=0-5%2" in done.stdout and "--mpi=pmix" in done.stdout
    assert not (tmp_path / "sweep.json").exists()


def test_hpcml_submit_dry_run_prints_the_script_and_submits_nothing():
    before = subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout
    done = subprocess.run(
        [PYTHON, "-m", "hpcml.login.cli", "submit", "--dry-run", "cluster=local", "optim.lr=0.01"],
        cwd=ROOT,
        env=mpi_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("#!/bin/bash") and "#SBATCH --nodes=2" in done.stdout
    assert "#SBATCH --array" not in done.stdout
    assert subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout == before


def test_a_learning_rate_sweep_of_the_lm_goes_out_as_one_array(tmp_path):
    """`+experiment=lm` composes with a sweep as any config does: three LM trials, one array."""
    done = run_sweep(
        "+experiment=lm",
        "cluster=local",
        "optim.lr=0.001,0.003,0.01",
        "launch.dry_run=true",
        f"hydra.sweep.dir={tmp_path}",
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("#!/bin/bash") == 1 and "#SBATCH --array=0-2" in done.stdout
