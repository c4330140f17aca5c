"""Starting benchmark workers: `mpirun` on this machine, or `srun --mpi=pmix` across the cluster's nodes.

Workers are `python -m hpcml.bench.<module> --worker ...`; rank 0 writes one JSON file, which the driver
reads back. A worker that fails takes the benchmark down with its output, never a silent zero.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpcml.errors import HpcmlError


class BenchmarkError(HpcmlError):
    """A benchmark worker failed; the message carries its output."""


class BenchmarkSkipped(Exception):
    """This machine lacks what the benchmark measures (a GPU, say); the message says what."""


@dataclass(frozen=True)
class Layout:
    """How the ranks of one measurement are placed, and the command prefix that places them."""

    name: str
    ranks: int
    prefix: tuple[str, ...]
    nodes: int = 1

    @staticmethod
    def local(ranks: int) -> Layout:
        if ranks == 1:
            return Layout("1 rank", 1, ())
        # --bind-to none: several ranks share this machine's few cores; pinning would stack them.
        return Layout(
            f"{ranks} ranks, mpirun, 1 node",
            ranks,
            ("mpirun", "--oversubscribe", "--bind-to", "none", "-np", str(ranks)),
        )

    @staticmethod
    def cluster(nodes: int, tasks_per_node: int, partition: str | None = None) -> Layout:
        prefix = [
            "srun",
            f"--nodes={nodes}",
            f"--ntasks-per-node={tasks_per_node}",
            "--mpi=pmix",
            "--kill-on-bad-exit=1",
        ]
        if partition:
            prefix.append(f"--partition={partition}")
        return Layout(
            f"{nodes * tasks_per_node} ranks, srun, {nodes} nodes", nodes * tasks_per_node, tuple(prefix), nodes
        )


def worker_env() -> dict[str, str]:
    return {
        **os.environ,
        "OMPI_ALLOW_RUN_AS_ROOT": "1",
        "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
        # One thread per rank: ranks share the cores, and torch's default of one thread per core would
        # make every multi-rank figure a measurement of oversubscription.
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        "PYTHONUNBUFFERED": "1",
    }


def run_worker(layout: Layout, module: str, args: list[str], timeout_s: float, cwd: Path) -> dict[str, Any]:
    """Run `python -m module --worker args --out FILE` under `layout`; return what rank 0 wrote."""
    # The output must be visible from every node: under the working directory, not a node-private /tmp.
    scratch = Path(tempfile.mkdtemp(prefix=".bench-", dir=cwd))
    out = scratch / "out.json"
    cmd = [*layout.prefix, sys.executable, "-m", module, "--worker", "--out", str(out), *args]
    try:
        done = subprocess.run(cmd, cwd=cwd, env=worker_env(), capture_output=True, text=True, timeout=timeout_s)
        if done.returncode != 0 or not out.is_file():
            raise BenchmarkError(
                f"`{' '.join(cmd)}` exited {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
            )
        return json.loads(out.read_text())
    except subprocess.TimeoutExpired as err:
        raise BenchmarkError(f"`{' '.join(cmd)}` ran past {timeout_s:.0f}s") from err
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def cluster_is_up() -> bool:
    """True when a Slurm controller answers (the local cluster from `make cluster-up`, or a real one)."""
    if shutil.which("sinfo") is None:
        return False
    done = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    states = done.stdout.split()
    # Busy nodes count: right after a benchmark cancels its jobs they are "completing" for a few seconds (the
    # tuning benchmark once found them so, after the submission one, and was refused).
    usable = ("idle", "mix", "alloc", "completing", "planned")
    return done.returncode == 0 and any(s.startswith(usable) for s in states)
