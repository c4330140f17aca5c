"""What runs on every rank: detect the launcher, start torch.distributed, train, tear down.

`run_training` is the one entry point for all launch modes (plain python, mpirun, srun via submitit,
sbatch). An exception on any rank is logged with its traceback and then ends every rank of the job
(MPI_Abort), so no peer is left blocked in a collective.
"""

from __future__ import annotations

import logging
import sys
import traceback
from pathlib import Path

from hpcml import mpi
from hpcml.config import TrainJobConfig
from hpcml.dist import setup_distributed, teardown_distributed
from hpcml.env import detect_environment
from hpcml.trainer import Trainer, TrainingResult

log = logging.getLogger("hpcml")

# Exit status of a rank that failed; MPI_Abort hands it to mpirun/srun.
EXIT_FAILURE = 1


def configure_logging(rank: int, output_dir: Path | None = None) -> None:
    fmt = f"[rank {rank}] %(asctime)s %(levelname)s %(name)s: %(message)s"
    root = logging.getLogger()
    root.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt, "%H:%M:%S"))
    root.addHandler(handler)
    if rank == 0 and output_dir is not None:
        output_dir.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(output_dir / "train.log")
        file_handler.setFormatter(logging.Formatter(fmt))
        root.addHandler(file_handler)
    root.setLevel(logging.INFO)


def end_all_ranks(rank: int, exc: BaseException) -> None:
    """Log this rank's traceback where the job log shows it, then take the whole job down."""
    text = "".join(traceback.format_exception(exc))
    sys.stderr.write("".join(f"[rank {rank}] {line}\n" for line in text.rstrip().splitlines()))
    sys.stderr.flush()
    mpi.abort_if_running(EXIT_FAILURE)


def run_training(cfg: TrainJobConfig) -> TrainingResult:
    env = detect_environment()
    rank = env.placement().rank
    configure_logging(rank, Path(cfg.train.output_dir) if rank == 0 else None)
    try:
        ctx = setup_distributed(env, cfg.train.backend, cfg.train.dist_timeout_s)
        log.info(
            "rank %d/%d on node %d/%d (local rank %d), launcher=%s backend=%s device=%s",
            ctx.rank,
            ctx.world_size,
            ctx.placement.node_rank,
            ctx.placement.num_nodes,
            ctx.placement.local_rank,
            ctx.launcher,
            ctx.backend,
            ctx.device,
        )
        result = Trainer(cfg, ctx).fit()
    except BaseException as exc:
        # No orderly teardown here: peers may be blocked in a collective, and destroying the process
        # group could wait on them. Aborting ends every rank at once.
        end_all_ranks(rank, exc)
        raise
    teardown_distributed()
    if ctx.is_main:
        log.info(
            "done: %d steps, test accuracy %.4f, params sha256 %s..., outputs in %s",
            result.steps,
            result.test_accuracy,
            result.params_sha256[:16],
            result.output_dir,
        )
    return result
