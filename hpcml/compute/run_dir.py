"""Naming a run's output directory the same on every rank, as Hydra resolvers (conf/train.yaml uses them).

jobs/train.py registers them on the login node and on every rank that runs Hydra itself (under mpirun).
"""

from __future__ import annotations

import time

from omegaconf import OmegaConf

from hpcml.compute.env import detect_environment


def _launcher_rank(environ: dict[str, str] | None = None) -> int:
    """This process's rank as its launcher set it, read before MPI or torch are up (0 when alone)."""
    return detect_environment(environ).placement().rank


def run_stamp() -> str:
    """A timestamp naming this run's directory, the same on every rank.

    Under mpirun each rank runs Hydra itself; rank clocks may straddle a second, so rank 0's stamp is
    broadcast over MPI (which the runtime would initialise moments later anyway).
    """
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    env = detect_environment()
    if env.uses_mpi and env.placement().world_size > 1:
        from hpcml.compute import mpi  # MPI starts only where an MPI launcher started us

        stamp = mpi.world().broadcast(stamp)
    return stamp


def hydra_output_subdir() -> str | None:
    """Only rank 0 writes Hydra's .hydra/ folder; N ranks writing one file would interleave it."""
    return ".hydra" if _launcher_rank() == 0 else None


def register_resolvers() -> None:
    for name, fn in (("hpcml_run_stamp", run_stamp), ("hpcml_hydra_subdir", hydra_output_subdir)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn, use_cache=True)
