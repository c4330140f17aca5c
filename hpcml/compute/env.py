"""Who started this process: torchrun, Open MPI's mpirun, an MPICH/PMI launcher, srun, or nobody.

Each launcher is a small class that is mostly a table from generic names (rank, world size, local rank,
node rank) to the variables that launcher sets; `LauncherEnvironment` does the reading and checks the
values. `detect_environment()` tries them in a fixed order and explains what it tried when none fits.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from hpcml.errors import EnvironmentDetectionError


@dataclass(frozen=True)
class ProcessPlacement:
    """Where one rank sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    num_nodes: int


class LauncherEnvironment:
    """One launcher: the variables it sets and whether its ranks share an MPI world."""

    name: ClassVar[str]
    # The variable whose presence means this launcher started us.
    marker: ClassVar[str]
    # Generic name -> variable name. Missing entries are derived (see placement()).
    variables: ClassVar[dict[str, str]]
    # True when mpi4py's COMM_WORLD spans all ranks, so rendezvous and the MPI gradient path can use it.
    uses_mpi: ClassVar[bool]

    def __init__(self, environ: Mapping[str, str]):
        self.environ = environ

    @classmethod
    def detect(cls, environ: Mapping[str, str]) -> bool:
        return cls.marker in environ

    def _int(self, generic: str) -> int | None:
        var = self.variables.get(generic)
        if var is None or var not in self.environ:
            return None
        raw = self.environ[var]
        try:
            value = int(raw)
        except ValueError:
            raise EnvironmentDetectionError(
                f"{self.name}: {var}={raw!r} is not an integer; the launcher environment is malformed "
                "(was the variable overwritten in a job script?)."
            ) from None
        if value < 0:
            raise EnvironmentDetectionError(f"{self.name}: {var}={value} is negative.")
        return value

    def placement(self) -> ProcessPlacement:
        rank, world = self._int("rank"), self._int("world_size")
        if rank is None or world is None:
            raise EnvironmentDetectionError(
                f"{self.name}: {self.variables['rank']} and {self.variables['world_size']} must both be set."
            )
        node_rank = self._int("node_rank")
        local_rank = self._int("local_rank")
        local_world = self._local_world_size(node_rank or 0)
        # A launcher that does not say otherwise is treated as one process per node.
        local_rank = 0 if local_rank is None else local_rank
        local_world = 1 if local_world is None else local_world
        num_nodes = self._int("num_nodes")
        if node_rank is None:
            node_rank = rank // local_world
        if num_nodes is None:
            num_nodes = max(1, world // local_world)
        if not 0 <= rank < world:
            raise EnvironmentDetectionError(f"{self.name}: rank {rank} is outside world size {world}.")
        if not 0 <= local_rank < local_world:
            raise EnvironmentDetectionError(
                f"{self.name}: local rank {local_rank} is outside local size {local_world}."
            )
        return ProcessPlacement(rank, world, local_rank, local_world, node_rank, num_nodes)

    def _local_world_size(self, node_rank: int) -> int | None:
        return self._int("local_world_size")

    def node_name(self) -> str:
        """A name that differs between nodes; Slurm's node name beats the hostname (logical nodes share a host)."""
        return self.environ.get("SLURMD_NODENAME") or socket.gethostname()


class TorchrunEnvironment(LauncherEnvironment):
    name = "torchrun"
    marker = "TORCHELASTIC_RUN_ID"
    variables = {
        "rank": "RANK",
        "world_size": "WORLD_SIZE",
        "local_rank": "LOCAL_RANK",
        "local_world_size": "LOCAL_WORLD_SIZE",
        "node_rank": "GROUP_RANK",
    }
    uses_mpi = False


class OpenMPIEnvironment(LauncherEnvironment):
    name = "Open MPI (mpirun)"
    marker = "OMPI_COMM_WORLD_SIZE"
    variables = {
        "rank": "OMPI_COMM_WORLD_RANK",
        "world_size": "OMPI_COMM_WORLD_SIZE",
        "local_rank": "OMPI_COMM_WORLD_LOCAL_RANK",
        "local_world_size": "OMPI_COMM_WORLD_LOCAL_SIZE",
    }
    uses_mpi = True


class PMIEnvironment(LauncherEnvironment):
    name = "PMI (MPICH / Intel MPI hydra)"
    marker = "PMI_SIZE"
    variables = {
        "rank": "PMI_RANK",
        "world_size": "PMI_SIZE",
        "local_rank": "MPI_LOCALRANKID",
        "local_world_size": "MPI_LOCALNRANKS",
    }
    uses_mpi = True


class SlurmEnvironment(LauncherEnvironment):
    name = "Slurm (srun)"
    # SLURM_STEP_ID exists only inside a job step, i.e. under srun, not in the batch shell.
    marker = "SLURM_STEP_ID"
    variables = {
        "rank": "SLURM_PROCID",
        "world_size": "SLURM_NTASKS",
        "local_rank": "SLURM_LOCALID",
        "node_rank": "SLURM_NODEID",
        "num_nodes": "SLURM_NNODES",
    }
    # With --mpi=pmix every task is an MPI rank; without it mpi4py sees singletons, which dist.py detects.
    uses_mpi = True

    def _local_world_size(self, node_rank: int) -> int | None:
        # SLURM_STEP_TASKS_PER_NODE looks like "2(x2)" or "3,2": this node's entry is the local size.
        spec = self.environ.get("SLURM_STEP_TASKS_PER_NODE") or self.environ.get("SLURM_TASKS_PER_NODE")
        return _tasks_on_node(spec, node_rank)


class SingleProcessEnvironment(LauncherEnvironment):
    name = "single process"
    marker = ""
    variables = {}
    uses_mpi = False

    @classmethod
    def detect(cls, environ: Mapping[str, str]) -> bool:
        return True

    def placement(self) -> ProcessPlacement:
        return ProcessPlacement(0, 1, 0, 1, 0, 1)


def _tasks_on_node(spec: str | None, node_rank: int) -> int | None:
    if not spec:
        return None
    counts: list[int] = []
    try:
        for part in spec.split(","):
            if "(x" in part:
                n, times = part.rstrip(")").split("(x")
                counts += [int(n)] * int(times)
            else:
                counts.append(int(part))
    except ValueError:
        raise EnvironmentDetectionError(f"Slurm (srun): cannot parse tasks per node {spec!r}.") from None
    return counts[node_rank] if node_rank < len(counts) else None


# Order matters and is deliberate:
# 1. torchrun sets its own variables and may itself run under srun, so it wins when present.
# 2. Open MPI / PMI next: mpirun inside an sbatch allocation inherits the batch step's SLURM_* variables,
#    which describe the batch shell, not the ranks.
# 3. srun: SLURM_STEP_ID is set only for tasks of a job step.
# 4. Nothing: a plain `python jobs/train.py`.
ENVIRONMENTS: tuple[type[LauncherEnvironment], ...] = (
    TorchrunEnvironment,
    OpenMPIEnvironment,
    PMIEnvironment,
    SlurmEnvironment,
    SingleProcessEnvironment,
)


def detect_environment(environ: Mapping[str, str] | None = None, allow_single: bool = True) -> LauncherEnvironment:
    environ = os.environ if environ is None else environ
    for cls in ENVIRONMENTS:
        if cls is SingleProcessEnvironment and not allow_single:
            break
        if cls.detect(environ):
            return cls(environ)
    tried = ", ".join(f"{c.name} ({c.marker})" for c in ENVIRONMENTS if c.marker)
    raise EnvironmentDetectionError(
        f"no launcher environment found; tried {tried}. Start the job with srun, mpirun or torchrun."
    )
