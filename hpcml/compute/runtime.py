"""What runs on every rank: detect the launcher, start torch.distributed, train, stop or finish.

`run_training` is the one entry point for all launch modes (plain python, mpirun, srun via submitit,
sbatch) and returns the rank's exit status (hpcml.compute.preempt.EXIT_*). An exception on any rank is logged
with its traceback and then ends every rank of the job (MPI_Abort), so no peer is left blocked in a
collective. A stop (signal or deadline) is saved by all ranks together; then rank 0 requeues the job.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist

from hpcml.compute import early_signals, host_memory, mpi, slurm_job, step_record
from hpcml.compute.dist import DistributedContext, broadcast_from_rank0, setup_distributed, teardown_distributed
from hpcml.compute.drills import crash_if_drilled, install_fault_drills
from hpcml.compute.env import detect_environment
from hpcml.compute.preempt import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_REQUEUE_LIMIT,
    EXIT_REQUEUED,
    EXIT_STOPPED,
    Deadline,
    PreemptionGuard,
    StopCoordinator,
    StopReason,
    StopRequest,
)
from hpcml.compute.trainer import Trainer
from hpcml.config import TrainJobConfig, parse_signal, validate
from hpcml.errors import HpcmlError, SubmissionError
from hpcml.fileio import write_atomically
from hpcml.outputs import JOB_RECORD, STOP_REQUEST
from hpcml.slurm_commands import REQUEUED_STATES

log = logging.getLogger("hpcml")


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


def end_all_ranks(rank: int, exc: BaseException, term_heard: Callable[[], bool] = lambda: False) -> None:
    """Log this rank's traceback where the job log shows it, then take the whole job down. Unless the error
    is a peer's disappearance, the batch shell is told it is the job's own: it must fail, never migrate.
    `term_heard`: whether a TERM came already, as a launcher ending the step sends one."""
    peer_lost = lost_a_peer(exc)
    if not peer_lost:
        step_record.mark_user_error()
    text = "".join(traceback.format_exception(exc))
    sys.stderr.write("".join(f"[rank {rank}] {line}\n" for line in text.rstrip().splitlines()))
    sys.stderr.flush()
    if peer_lost:
        # The launcher reports only the first rank to end, and the batch shell moves the job off a node only
        # when that report names ranks killed there. An abort reported first hides it: seen in CI, where a
        # survivor's MPI_ABORT beat mpirun's notice of the SIGKILL and the job failed instead of moving.
        wait_for_the_launcher(PEER_LOSS_GRACE_S, term_heard)
    mpi.abort_if_running(EXIT_FAILED)


def wait_for_the_launcher(seconds: float, term_heard: Callable[[], bool] = lambda: False) -> None:
    """Up to `seconds`, or until a TERM, now or before (`term_heard`): a launcher that saw a rank die ends the
    others with one (srun, mpirun), after its report. This rank handles TERM (hpcml's early-signal recorder
    does, once the guard is gone), so the TERM alone would not end it."""
    terms: list[int] = []  # appending is all a handler may do: no lock another frame of this thread may hold
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: terms.append(signum)) if on_main_thread else None
    try:
        deadline = time.monotonic() + seconds
        while not terms and not term_heard() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous)


# What a collective raises when a peer process vanished (killed, or its node gone), in words no error of the
# job's own code uses: an error of gloo's TCP transport (a closed or reset connection), NCCL's report of a
# remote rank's end.
PEER_LOST_MESSAGES = ("gloo/transport/tcp", "Connection closed by peer", "ncclRemoteError", "remote process exited")


# How long a rank that lost a peer leaves the launcher to report that peer's end before aborting the job.
PEER_LOSS_GRACE_S = 10.0


def lost_a_peer(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it) says a peer vanished, not that this rank's own work failed."""
    while exc is not None:
        if isinstance(exc, dist.DistNetworkError) or any(m in str(exc) for m in PEER_LOST_MESSAGES):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def record_job(output_dir: Path, num_nodes: int) -> None:
    """Which Slurm job (and which restart of it) wrote this output directory, for `hpcml status`."""
    env = dict(os.environ)
    job_id = slurm_job.current_job_id(env)
    restarts = slurm_job.restart_count(env)
    path = output_dir / JOB_RECORD
    # Start-up relaunches (batch_shell.sh) add up over the job's attempts: each attempt records once. The node
    # count of each attempt is kept too (an elastic job's attempts may differ).
    earlier_retries, earlier_nodes = 0, []
    try:
        earlier = json.loads(path.read_text())
        if earlier.get("job_id") == job_id and earlier.get("restart_count", restarts) < restarts:
            earlier_retries = int(earlier.get("startup_retries", 0))
            earlier_nodes = [int(n) for n in earlier.get("attempt_nodes", [])]
    except (OSError, ValueError, TypeError):
        pass
    record = {
        "job_id": job_id,
        "restart_count": restarts,
        "nodes": env.get("SLURM_JOB_NODELIST"),
        "attempt_nodes": [*earlier_nodes, num_nodes],
        # Nodes the job lost a peer on and requeued itself without (batch_shell.sh), one per migration.
        "lost_nodes": step_record.lost_nodes(env),
        "started": time.time(),
        "startup_retries": earlier_retries + step_record.startup_retries(env),
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(output_dir / JOB_RECORD, lambda f: f.write(json.dumps(record, indent=2).encode()))


def requeue_or_stop(cfg: TrainJobConfig, reason: StopReason, request: StopRequest | None = None) -> int:
    """Rank 0's decision after a stop has been saved: requeue, give up at the cap, or just exit."""
    if reason is StopReason.REQUESTED:
        # Asked from outside (a study pruned the trial): the job ends here, successfully, and frees its nodes.
        log.warning("stopped: %s; checkpoint saved, not requeued", request.reason if request else "requested")
        return EXIT_OK
    job_id = slurm_job.current_job_id(dict(os.environ))
    if job_id is None or not cfg.preempt.requeue:
        log.warning(
            "stopped (%s) with a checkpoint saved; not requeued: run the same command to resume", reason.name.lower()
        )
        return EXIT_STOPPED
    if slurm_job.state(job_id) == "CANCELLED":
        # `scancel <job>`: the user ended it. Slurm would still accept a requeue, and bring it back.
        log.warning("job %s was cancelled: checkpoint saved, not requeued; resubmit to resume", job_id)
        return EXIT_STOPPED
    restarts = slurm_job.restart_count(dict(os.environ))
    if restarts >= cfg.preempt.max_requeues:
        message = f"hpcml: requeue cap reached ({restarts} restarts, preempt.max_requeues={cfg.preempt.max_requeues})"
        log.error("%s; the job fails here. The checkpoint is saved: resubmit to continue.", message)
        try:
            slurm_job.set_comment(job_id, message)
        except SubmissionError as err:
            log.warning("could not record the reason in Slurm: %s", err)
        return EXIT_REQUEUE_LIMIT
    try:
        slurm_job.requeue(job_id)
    except SubmissionError as err:
        if "pending execution" in str(err) or slurm_job.state(job_id) in REQUEUED_STATES:
            # Slurm is requeueing the job already (`scontrol requeue` from outside, or PreemptMode=REQUEUE).
            log.warning(
                "stopped (%s) at a saved checkpoint; Slurm is requeueing job %s already", reason.name.lower(), job_id
            )
            return EXIT_REQUEUED
        log.error("checkpoint saved but `scontrol requeue %s` failed: %s; resubmit to resume", job_id, err)
        return EXIT_STOPPED
    log.warning(
        "stopped (%s) at a saved checkpoint; job %s requeued (restart %d)", reason.name.lower(), job_id, restarts + 1
    )
    return EXIT_REQUEUED


def stop_coordinator(cfg: TrainJobConfig, ctx: DistributedContext, guard: PreemptionGuard) -> StopCoordinator:
    end_time = None
    job_id = slurm_job.current_job_id(dict(os.environ))
    if ctx.is_main and job_id is not None:
        end_time = slurm_job.end_time(job_id)
    return StopCoordinator(
        guard,
        Deadline(end_time, cfg.preempt.deadline_margin_s),
        ctx.device,
        ctx.world_size,
        ctx.is_main,
        over_mpi=ctx.uses_mpi,
        timeout_s=cfg.train.dist_timeout_s,
        request=StopRequest(Path(cfg.train.output_dir) / STOP_REQUEST if ctx.is_main else None),
    )


def run_training(cfg: TrainJobConfig) -> int:
    env = detect_environment()
    rank = env.placement().rank
    configure_logging(rank, Path(cfg.train.output_dir) if rank == 0 else None)
    # Installed before anything slow, so an early SIGTERM is remembered, not fatal.
    guard = PreemptionGuard([parse_signal(cfg.preempt.signal), parse_signal("TERM")])
    try:
        with guard:
            crash_if_drilled(cfg.fault, rank)
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
            # Before the model is built: blocks allocated earlier keep the kind they were given.
            freed = host_memory.apply(cfg.train.freed_host_memory, cfg.train.grad_sync, ctx.device)
            if ctx.is_main:
                log.info("%s", freed)
                step_record.mark_formed()  # from here on a failure is the job's own, not start-up's
                record_job(Path(cfg.train.output_dir), ctx.placement.num_nodes)
            coordinator = stop_coordinator(cfg, ctx, guard)
            trainer = Trainer(cfg, ctx, coordinator)
            install_fault_drills(trainer, cfg.fault)
            outcome = trainer.fit()
            del trainer  # see gc.collect() below
            if outcome.stopped is StopReason.NONE:
                code = EXIT_OK
            else:
                code = requeue_or_stop(cfg, outcome.stopped, coordinator.request) if ctx.is_main else EXIT_OK
                code = broadcast_from_rank0(code, ctx)
            guard.ignore_late_signals()  # the run is over: what remains is teardown and exit
    except BaseException as exc:
        # No orderly teardown here: peers may be blocked in a collective, and destroying the process
        # group could wait on them. Aborting ends every rank at once.
        # A TERM the guard heard, or the early-signal recorder after it (the handler once the guard is gone).
        end_all_ranks(
            rank, exc, term_heard=lambda: signal.SIGTERM in guard.heard or signal.SIGTERM in early_signals.SEEN
        )
        raise
    # The finished trainer's DDP holds the process group through reference cycles; free it now, while gloo's
    # worker threads can still take the GIL, not in the collector's last pass at interpreter exit.
    gc.collect()
    teardown_distributed()
    if ctx.uses_mpi and ctx.world_size > 1:
        mpi.world().barrier()  # nobody exits (taking the store or its sockets) while a peer still tears down
    if ctx.is_main and code == EXIT_OK:
        # Every rank is past the barrier: a time-limit warning from here on must not fail the finished job.
        step_record.mark_finished()
    if outcome.result is not None and ctx.is_main:  # None: stopped on request (a pruned trial), said above
        r = outcome.result
        log.info(
            "done: %d steps, %s, params sha256 %s..., outputs in %s",
            r.steps,
            ", ".join(f"{k} {v:.4f}" for k, v in r.metrics.items()) or "no eval data",
            r.params_sha256[:16],
            r.output_dir,
        )
    return code


def run_job(config: dict) -> int:
    """A submitted job's rank (hpcml.job_entry.TrainingJob): check the config, train, and leave with the
    rank's documented exit status, which Slurm records as the job's exit code."""
    try:
        cfg = validate(config)
    except HpcmlError:
        step_record.mark_user_error()
        raise
    code = run_training(cfg)
    if code != EXIT_OK:
        sys.exit(code)  # submitit sees no result for a stopped attempt
    return code
