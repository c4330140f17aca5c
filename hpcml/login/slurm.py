"""What the login node asks Slurm: partitions and their sizes, MaxArraySize, the states of array tasks."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from hpcml.slurm_commands import query, run


@dataclass(frozen=True)
class Partition:
    name: str
    nodes: int
    is_default: bool
    # The most GPUs any of its nodes has (gres gpu), 0 without.
    gpus_per_node: int = 0


def partitions() -> dict[str, Partition]:
    """The cluster's partitions with their node counts and GPUs per node; the default one is flagged."""
    found: dict[str, Partition] = {}
    for line in run(["sinfo", "-h", "-o", "%P %D %G"]).splitlines():
        name, count, *gres = line.split()
        is_default = name.endswith("*")
        name = name.rstrip("*")
        # sinfo prints one line per node state (and kind of node); add them up.
        prev = found.get(name)
        found[name] = Partition(
            name,
            int(count) + (prev.nodes if prev else 0),
            is_default or bool(prev and prev.is_default),
            max(gpus_in_gres(" ".join(gres)), prev.gpus_per_node if prev else 0),
        )
    return found


def gpus_in_gres(gres: str) -> int:
    """GPUs per node in sinfo's %G: `gpu:4`, `gpu:a100:4(S:0-1)`, `gpu:a100:2,gpu:v100:2`, `(null)`."""
    return sum(int(m.group(1)) for m in re.finditer(r"gpu(?::[^:,(\s]+)?:(\d+)", gres))


def max_array_size() -> int:
    """Slurm's MaxArraySize (array indices run from 0 to this minus 1); Slurm's default when unset."""
    return parse_max_array_size(run(["scontrol", "show", "config"]))


def parse_max_array_size(show_config: str) -> int:
    match = re.search(r"^MaxArraySize\s*=\s*(\d+)", show_config, re.MULTILINE)
    return int(match.group(1)) if match else 1001


def array_task_states(job_ids: list[str]) -> dict[str, tuple[str, str]]:
    """Array task id (`<array>_<index>`) -> (state, elapsed): finished ones from sacct's last attempt,
    live ones from squeue (which wins: sacct lags a running task)."""
    if not job_ids:
        return {}
    arrays = ",".join(sorted({j.split("_")[0] for j in job_ids}))
    states: dict[str, tuple[str, str]] = {}
    for line in query(["sacct", "-X", "-n", "-P", "-j", arrays, "-o", "JobID,State,Elapsed"]).splitlines():
        parts = line.split("|")
        if len(parts) == 3:
            states[parts[0]] = (parts[1].split()[0], parts[2])
    for line in query(["squeue", "-h", "-r", "-j", arrays, "-o", "%i|%T|%M"]).splitlines():
        parts = line.split("|")
        if len(parts) == 3:
            states[parts[0]] = (parts[1], parts[2])
    return states


def jobs_named(names: list[str], since: float) -> dict[str, str]:
    """Job name -> the newest job id with that name submitted since `since` (a Unix time): queued or running
    ones from squeue, ended ones from sacct. How a restarted study driver finds trials it submitted just before
    it was stopped, before it could write their ids down."""
    if not names:
        return {}
    found: dict[str, str] = {}
    start = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(since - 60))
    sacct = ["sacct", "-X", "-n", "-P", "-S", start, "--name", ",".join(names), "-o", "JobName,JobID"]
    squeue = ["squeue", "-h", "--name", ",".join(names), "-o", "%j|%i"]
    # `run`, not `query`: a lookup that failed must not read as "never submitted" (a duplicate would follow).
    for line in [*run(sacct).splitlines(), *run(squeue).splitlines()]:
        name, _, job_id = line.partition("|")
        if name in names and job_id and (name not in found or int(job_id) > int(found[name])):
            found[name] = job_id
    return found


def cancel_named(prefix: str) -> list[str]:
    """Cancel every queued or running job of this user whose name starts with `prefix` (a study's driver and
    trials all start with hpcml-study-<token>); returns their ids."""
    listed = query(["squeue", "-h", "--me", "-o", "%i|%j"]).split()
    jobs = [job for job, _, name in (line.partition("|") for line in listed) if name.startswith(prefix)]
    if jobs:
        run(["scancel", *jobs])
    return jobs
