"""Small, mockable wrappers around the Slurm commands hpcml calls (sinfo, scontrol, sacct)."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass

from hpcml.errors import SubmissionError


@dataclass(frozen=True)
class Partition:
    name: str
    nodes: int
    is_default: bool


def _slurm(cmd: list[str]) -> str:
    if shutil.which(cmd[0]) is None:
        raise SubmissionError(
            f"`{cmd[0]}` is not on PATH: this machine has no Slurm client. Run `make cluster-up` for the local "
            "cluster, or run from your site's login node."
        )
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise SubmissionError(f"`{' '.join(cmd)}` failed: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def partitions() -> dict[str, Partition]:
    """The cluster's partitions with their node counts; the default one is flagged."""
    found: dict[str, Partition] = {}
    for line in _slurm(["sinfo", "-h", "-o", "%P %D"]).splitlines():
        name, count = line.split()
        is_default = name.endswith("*")
        name = name.rstrip("*")
        # sinfo prints one line per node state; add them up.
        prev = found.get(name)
        found[name] = Partition(
            name, int(count) + (prev.nodes if prev else 0), is_default or bool(prev and prev.is_default)
        )
    return found
