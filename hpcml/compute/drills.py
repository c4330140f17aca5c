"""Deliberate faults (`fault.*`) for the fault tests and for drills on a real cluster: a rank that raises,
hangs or crashes at start-up, a save killed half-way, a slowed step, a step held until a signal comes. They
hook into the Trainer from outside its loop (`Trainer.after_step`, `between_micro_batches`, `before_save`,
and a sharded save's `before_commit`), so a run that drills nothing runs none of this."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from hpcml.compute import checkpoint as ckpt
from hpcml.compute import slurm_job, step_record
from hpcml.config import FaultConfig

if TYPE_CHECKING:
    from hpcml.compute.trainer import Trainer

log = logging.getLogger(__name__)


def crash_if_drilled(fault: FaultConfig, rank: int) -> None:
    """fault.crash_at_start_launches: die as an MPI start-up crash does, before joining the world."""
    if rank == fault.rank and step_record.startup_retries() < fault.crash_at_start_launches:
        sys.stderr.write(f"[rank {rank}] fault.crash_at_start_launches: crashing before the world forms\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGSEGV)


def install_fault_drills(trainer: Trainer, fault: FaultConfig) -> None:
    """Hook the drills `fault` asks for into `trainer`; none when it asks for none."""
    if any(
        (
            fault.raise_at_step is not None,
            fault.hang_at_step is not None,
            fault.raise_if_file_exists,
            fault.step_sleep_s,
            fault.hold_for_signal_at_steps,
        )
    ):
        trainer.after_step.append(lambda t: after_step(t, fault))
    if fault.kill_during_save_at_step is not None:
        if trainer.checkpoints.sharded:
            trainer.checkpoints.before_commit.append(lambda partial: kill_during_sharded_save(trainer, fault, partial))
        else:
            trainer.before_save.append(lambda t: kill_during_save(t, fault))
    if fault.pause_between_micro_batches_at_step is not None:
        trainer.between_micro_batches.append(pause_between_micro_batches(fault.pause_between_micro_batches_at_step))


def after_step(trainer: Trainer, fault: FaultConfig) -> None:
    step, rank = trainer.step, trainer.ctx.rank
    if fault.raise_at_step == step and fault.rank == rank:
        raise RuntimeError(f"injected fault on rank {rank} at step {step} (fault.raise_at_step)")
    if fault.hang_at_step == step and fault.rank == rank:
        log.error("fault.hang_at_step=%d: this rank stops answering", step)
        while True:
            time.sleep(3600)
    if fault.raise_if_file_exists and Path(fault.raise_if_file_exists).exists():
        raise RuntimeError(f"injected fault: {fault.raise_if_file_exists} exists (fault.raise_if_file_exists)")
    if step in fault.hold_for_signal_at_steps:
        hold_for_signal(trainer)
    if fault.step_sleep_s:
        time.sleep(fault.step_sleep_s)


# The longest a drilled hold waits for its signal: a test that never sends one fails on its own checks
# instead of leaving its run held.
HOLD_FOR_SIGNAL_LIMIT_S = 180.0


def hold_for_signal(trainer: Trainer) -> None:
    """fault.hold_for_signal_at_steps: wait at this step's end until a warning signal has reached this rank.
    The step-boundary agreement that follows then stops the run at exactly this step.

    Meant for interrupts that signal every rank (`scontrol requeue`, `scancel --signal`, a preemption): a rank
    that hears nothing waits out the limit, and its peers wait for it in the agreement. The limit is at most
    half the collective timeout, so that wait fails nothing."""
    if trainer.stop is None:
        log.warning("fault.hold_for_signal_at_steps: this trainer hears no signals; not holding")
        return
    limit_s = min(HOLD_FOR_SIGNAL_LIMIT_S, trainer.cfg.train.dist_timeout_s / 2)
    log.warning("fault.hold_for_signal_at_steps: holding at step %d until a signal comes", trainer.step)
    give_up_at = time.monotonic() + limit_s
    while trainer.stop.guard.received is None:
        if time.monotonic() > give_up_at:
            log.error("fault.hold_for_signal_at_steps: no signal came in %.0f s; going on", limit_s)
            return
        time.sleep(0.05)


def kill_during_save(trainer: Trainer, fault: FaultConfig) -> None:
    """On the writing rank, in the first attempt only (the restarted job must get past this step): die with
    the checkpoint half-written, a partial folder with no manifest."""
    if fault.kill_during_save_at_step != trainer.step or slurm_job.restart_count(os.environ) != 0:
        return
    if not trainer.ctx.is_main:
        return
    partial = trainer.checkpoint_dir / f".{ckpt.step_dir_name(trainer.step)}.partial"
    partial.mkdir(parents=True, exist_ok=True)
    (partial / ckpt.STATE_FILE).write_bytes(b"half a checkpoint")
    log.error("fault.kill_during_save_at_step=%d: killing rank 0 in the middle of a save", trainer.step)
    os.kill(os.getpid(), signal.SIGKILL)


def kill_during_sharded_save(trainer: Trainer, fault: FaultConfig, partial: Path) -> None:
    """On rank `fault.rank`, in the first attempt only: die once every shard of the save is on disk (this
    rank's is), before the commit; the shard is cut in half first, as a kill mid-write leaves it."""
    if fault.kill_during_save_at_step != trainer.step or slurm_job.restart_count(os.environ) != 0:
        return
    if trainer.ctx.rank != fault.rank:
        return
    for shard in partial.glob(f"shards/__{trainer.ctx.rank}_*.distcp"):
        os.truncate(shard, shard.stat().st_size // 2)
    log.error(
        "fault.kill_during_save_at_step=%d: killing rank %d in the middle of a sharded save", trainer.step, fault.rank
    )
    os.kill(os.getpid(), signal.SIGKILL)


# How long a drilled pause between micro-batches lasts: time for a test to see it and interrupt.
MICRO_BATCH_PAUSE_S = 8.0


def pause_between_micro_batches(step: int):
    """fault.pause_between_micro_batches_at_step: after the first micro-batch of `step`, say so and wait, so
    that a test can land an interrupt in the middle of a step (it must stop at the step's end)."""
    paused = False

    def hook(trainer: Trainer) -> None:
        nonlocal paused
        if trainer.step + 1 == step and not paused:
            paused = True
            log.warning("fault.pause_between_micro_batches_at_step: pausing between micro-batches of step %d", step)
            time.sleep(MICRO_BATCH_PAUSE_S)

    return hook
