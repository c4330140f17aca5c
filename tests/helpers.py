"""Helpers shared by the tests: where things are, and how to run hpcml as a user does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
TRAIN = str(ROOT / "jobs" / "train.py")


def mpi_env() -> dict[str, str]:
    return {
        **os.environ,
        "OMPI_ALLOW_RUN_AS_ROOT": "1",
        "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }


def run_train(args: list[str], ranks: int = 1, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    """`python jobs/train.py ARGS`, under `mpirun -np RANKS` when RANKS > 1.

    On CPUs unless ARGS name a backend: these tests compare runs bitwise, and on a GPU machine several
    ranks would otherwise share its GPU (tests/test_gpu.py covers the GPU path).
    """
    if not any(a.startswith("train.backend=") for a in args):
        args = [*args, "train.backend=gloo"]
    cmd = [PYTHON, TRAIN, *args]
    if ranks > 1:
        cmd = ["mpirun", "--oversubscribe", "--bind-to", "none", "-np", str(ranks), *cmd]
    done = subprocess.run(cmd, cwd=ROOT, env=mpi_env(), capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
    return done


def read_result(output_dir: Path) -> dict:
    return json.loads((output_dir / "result.json").read_text())


def sacct_state(job_id: str) -> str:
    out = subprocess.run(
        ["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "State"], capture_output=True, text=True
    ).stdout
    return out.strip().splitlines()[0] if out.strip() else ""


def node_states() -> dict[str, str]:
    out = subprocess.run(["sinfo", "-N", "-h", "-o", "%N %T"], capture_output=True, text=True).stdout
    return dict(line.split() for line in out.splitlines())


def attempts(job_id: str) -> list[str]:
    """Every attempt of a job, oldest first, as sacct records them (a requeued attempt reads REQUEUED)."""
    out = subprocess.run(
        ["sacct", "-X", "-D", "-n", "-P", "-j", job_id, "-o", "State"], capture_output=True, text=True
    ).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def last_logged_step(out_dir: Path) -> int:
    path = out_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]
    return max(steps, default=0)
