"""A run's checkpoints: which one it resumes from and how that state goes back in, and how the state of a
step is saved, in the run's layout: replicated (DDP: rank 0 writes the whole state) or sharded (FSDP: every
rank writes its own shard). Either run loads either layout.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from hpcml.compute import checkpoint as ckpt
from hpcml.compute.checkpoint import sharded
from hpcml.compute.dist import DistributedContext, broadcast_from_rank0
from hpcml.compute.fsdp import is_sharded
from hpcml.config import CheckpointConfig
from hpcml.errors import ConfigError

log = logging.getLogger(__name__)

# State that checkpoints of earlier hpcml versions lack; a resume from one leaves it as it is.
ADDED_LATER = ("grad_sync", "data_stream")


class RunCheckpoints:
    """`stateful` maps names to objects with state_dict()/load_state_dict(); its "model" and "optimizer"
    are saved sharded when the model is (FSDP)."""

    def __init__(
        self,
        cfg: CheckpointConfig,
        ctx: DistributedContext,
        directory: Path,
        stateful: dict[str, Any],
        collective_timeout_s: float = 300.0,
    ):
        self.cfg, self.ctx, self.directory, self.stateful = cfg, ctx, directory, stateful
        self.model: torch.nn.Module = stateful["model"]
        self.optimizer: torch.optim.Optimizer = stateful["optimizer"]
        self.sharded = is_sharded(self.model)
        # Replicated saves are rank 0's alone, inline or on its background writer.
        self.writer = (
            ckpt.CheckpointWriter(directory, cfg.keep_last, cfg.async_save)
            if ctx.is_main and not self.sharded
            else None
        )
        # Sharded saves are every rank's (building the writer is a collective when it is asynchronous).
        self.sharded_writer = (
            sharded.ShardedCheckpointWriter(
                directory, cfg.keep_last, cfg.async_save, ctx, self._before_commit, collective_timeout_s
            )
            if self.sharded
            else None
        )
        self._state_by_name = sharded.StateByName(self.model, self.optimizer) if self.sharded else None
        self.last_committed: Path | None = None
        # Called on every rank with the partial folder of a sharded save, once that rank's shard is durable and
        # before the commit (drills.py); empty in a normal run.
        self.before_commit: list[Callable[[Path], None]] = []

    def replicated_state(self) -> dict[str, Any]:
        """What goes into train_state.pt: everything, or everything but the shards."""
        names = [n for n in self.stateful if not (self.sharded and n in sharded.SHARDED_STATE)]
        return {name: self.stateful[name].state_dict() for name in names}

    # ------------------------------------------------------------ resuming

    def choose(self) -> ckpt.LoadedCheckpoint | None:
        """Rank 0 picks, verifies and loads train_state.pt; every rank learns which checkpoint (and loads its
        train_state.pt and RNG state too). Shards are loaded by `restore`."""
        mine, choice = None, None
        if self.ctx.is_main:
            if self.cfg.resume == "auto":
                mine = ckpt.load_latest_verified(self.directory, self.ctx.rank, self.ctx.device)
            elif self.cfg.resume != "none":
                mine = ckpt.verify_and_load(Path(self.cfg.resume), self.ctx.rank, self.ctx.device)
            choice = (str(mine.path), mine.manifest) if mine else None
        choice = broadcast_from_rank0(choice, self.ctx)
        if mine is not None or choice is None:
            return mine
        # Rank 0 verified it; the others only load.
        return ckpt.load_checkpoint(Path(choice[0]), choice[1], self.ctx.rank, self.ctx.device)

    def restore(self, loaded: ckpt.LoadedCheckpoint) -> None:
        """Put `loaded`'s state back into every stateful object (a collective when shards are involved)."""
        state = loaded.train_state
        names = list(self.stateful)
        if loaded.layout == ckpt.SHARDED:
            sharded.load_sharded_into(loaded.path, self.model, self.optimizer)
            names = [n for n in names if n not in sharded.SHARDED_STATE]
        elif self.sharded:
            self._require(loaded, state, sharded.SHARDED_STATE)
            sharded.load_whole_into(self.model, self.optimizer, state["model"], state["optimizer"])
            names = [n for n in names if n not in sharded.SHARDED_STATE]
        for name in names:
            obj = self.stateful[name]
            # Checkpoints of earlier versions also hold "scaler": None (an unused mixed-precision slot); never read.
            if name == "grad_scaler" and name not in state:
                # Written without fp16: the loss scale starts afresh, as it did when that run started.
                log.warning(
                    "%s holds no fp16 loss scale (it was written with another precision): starting one", loaded.path
                )
            elif name not in ADDED_LATER:
                self._require(loaded, state, (name,))
            obj.load_state_dict(state.get(name))

    @staticmethod
    def _require(loaded: ckpt.LoadedCheckpoint, state: dict[str, Any], names: tuple[str, ...]) -> None:
        for name in names:
            if name not in state:
                raise ConfigError(
                    f"{loaded.path} holds no {name!r} state (it holds {', '.join(sorted(state))}): it was written by "
                    f"a run with another {name}. Resume with the same config, or start fresh with checkpoint.resume=none."
                )

    # ------------------------------------------------------------ saving

    def save(self, step: int, header: dict[str, Any], wait: bool) -> float:
        """Save the state of `step` (a collective: every rank calls it at the same step boundary). With an
        asynchronous replicated writer, rank 0 hands the live state to its thread and returns; `wait` waits
        for the commit. Returns how long a save takes: this one's stall, or the last write if longer."""
        if self.sharded:
            # Each rank's RNG state goes to rank 0 with its shard's checksums, while committing.
            return self._save_sharded(step, header, ckpt.capture_rng_state(), wait)
        rng_states = [ckpt.capture_rng_state()]
        if self.ctx.world_size > 1:
            rng_states = [None] * self.ctx.world_size
            dist.all_gather_object(rng_states, ckpt.capture_rng_state())
        if self.writer is None:
            return 0.0
        # An async writer copies the live state on its own thread, while the next step's forward and backward
        # run; the trainer waits for that copy (wait_staged) before the weights change.
        snap = ckpt.Snapshot(step, **header, train_state=self.replicated_state(), rng_states=rng_states)
        started = time.perf_counter()
        self.writer.submit(snap, stage=self.writer.asynchronous)
        if wait:
            self.writer.wait()
        self.last_committed = self.writer.last_committed
        return max(time.perf_counter() - started, self.writer.last_write_s or 0.0)

    def _save_sharded(self, step: int, header: dict[str, Any], rng_state: dict[str, Any], wait: bool) -> float:
        started = time.perf_counter()
        rest = self.replicated_state() if self.ctx.is_main else None
        shards = self._state_by_name.read()
        self.sharded_writer.submit(sharded.ShardedSave(step, header, shards, rest, rng_state), wait)
        self.last_committed = self.sharded_writer.last_committed
        return max(time.perf_counter() - started, self.sharded_writer.last_write_s or 0.0)

    def close(self) -> None:
        """At the end of the run: the last save is committed, and the checkpoints it made old are deleted."""
        for writer in (self.writer, self.sharded_writer):
            if writer is not None:
                writer.close()

    def _before_commit(self, partial: Path) -> None:
        for hook in self.before_commit:
            hook(partial)

    def prepare(self) -> None:
        """At start-up: the replicated writer allocates its staging buffers (an asynchronous sharded writer
        allocates its own at its first save: the optimizer state it copies may not exist before a step)."""
        if self.writer is not None:
            self.writer.prepare(self.replicated_state())

    def wait_staged(self) -> None:
        """Before anything changes the weights: the write in flight no longer reads them."""
        if self.writer is not None:
            self.writer.wait_staged()
