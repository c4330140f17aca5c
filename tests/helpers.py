"""Helpers shared by the tests: where things are, and how to run hpcml as a user does."""

from __future__ import annotations

import contextlib
import itertools
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
    # tests/ on the path: the ranks import tests/user_code.py, the way a user's project is on theirs.
    path = os.pathsep.join(p for p in (str(ROOT / "tests"), os.environ.get("PYTHONPATH")) if p)
    return {
        **os.environ,
        "PYTHONPATH": path,
        "OMPI_ALLOW_RUN_AS_ROOT": "1",
        "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }


def run_train(
    args: list[str], ranks: int = 1, timeout: float = 300, check: bool = True, launcher: str = "mpirun"
) -> subprocess.CompletedProcess:
    """`python jobs/train.py ARGS`, under `mpirun -np RANKS` when RANKS > 1 (or torchrun's
    `--nproc_per_node=RANKS`: no MPI world, every collective through torch.distributed).

    On CPUs unless ARGS name a backend: these tests compare runs bitwise, and on a GPU machine several
    ranks would otherwise share its GPU (tests/test_gpu.py covers the GPU path).
    """
    if not any(a.startswith("train.backend=") for a in args):
        args = [*args, "train.backend=gloo"]
    cmd = [PYTHON, TRAIN, *args]
    if ranks > 1 and launcher == "torchrun":
        cmd = [PYTHON, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", TRAIN, *args]
    elif ranks > 1:
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


def executed_spans(rank0_log: str) -> list[tuple[int, int | None]]:
    """(first step, last step) of each attempt in a job's rank-0 log, in order: an attempt starts at 0 or at
    the step it resumed from, and ends where it stopped or finished (None: it never said)."""
    import re

    spans: list[list] = []
    for line in rank0_log.splitlines():
        if not line.startswith("[rank 0]"):  # mpirun's log holds every rank's lines
            continue
        if re.search(r"INFO hpcml: rank 0/\d+ on node", line):
            spans.append([0, None])
        elif spans and (found := re.search(r"resumed from \S+ \(step (\d+)", line)):
            spans[-1][0] = int(found.group(1))
        elif spans and (found := re.search(r"stopping at step (\d+)|done: (\d+) steps", line)):
            spans[-1][1] = int(found.group(1) or found.group(2))
    return [(start, end) for start, end in spans]


def assert_nothing_lost(rank0_log: str, total_steps: int, attempts: int) -> None:
    """Each attempt resumed from exactly the step the one before stopped at, and the steps executed over
    all attempts add up to the run's steps: none repeated, none skipped."""
    spans = executed_spans(rank0_log)
    assert len(spans) == attempts, spans
    assert spans[0][0] == 0 and all(end is not None for _, end in spans), spans
    for (_, stopped), (resumed, _) in itertools.pairwise(spans):
        assert resumed == stopped, f"stopped at {stopped} but resumed at {resumed}: {spans}"
    assert sum(end - start for start, end in spans) == total_steps, spans


def assert_a_restart_per_interrupt(history: list[str], rank0_log: str, interrupts: int, total_steps: int) -> None:
    """The job's attempts (sacct's states) and rank 0's log (or mpirun's, which holds every rank's lines) of a run
    interrupted `interrupts` times: every attempt but the last stopped on a signal at a saved checkpoint, the
    next resumed there, and every step ran once.

    One more attempt is allowed for each signal that reached an attempt no test had signalled (a starved
    slurmd's resent TERM, it seems), checked like the others."""
    assert history[-1] == "COMPLETED" and len(history) >= interrupts + 1, history
    stops = [line for line in rank0_log.splitlines() if line.startswith("[rank 0]") and "(signal): saving a" in line]
    assert len(stops) == len(history) - 1, f"{history}\n{rank0_log[-3000:]}"
    assert_nothing_lost(rank0_log, total_steps, attempts=len(history))


@contextlib.contextmanager
def site_policy(*flags: str):
    """The local cluster reconfigured as a site may run it (`localcluster up` flags), then restored."""

    def up(*args: str) -> None:
        cmd = [PYTHON, "-m", "hpcml.localcluster", "up", "--state-dir", str(ROOT / ".cluster"), *args]
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=300)

    up(*flags)
    try:
        yield
    finally:
        up()
