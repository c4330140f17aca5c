"""The sharded layout (FSDP): every rank writes its own shard of the model and optimizer state through
torch.distributed.checkpoint (DCP), all in parallel, into one folder; rank 0 adds the rest of the training
state (schedule, data position, ...) and every rank's RNG state, gathers each rank's checksums of what it
wrote, and commits the folder with one manifest naming every file of every rank (layout.py). A shard that
is truncated or missing fails verification like any other file.

DCP reshards on load: a checkpoint saved at N ranks loads at any M, and into an unsharded (DDP) model too.
The model and optimizer states go through torch's distributed state-dict API, keyed by parameter name, so
the same files load whether the parameters are sharded DTensors or whole tensors.
"""

from __future__ import annotations

import copy
import datetime
import logging
import operator
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

# torch's own staging helpers: what DCP's FileSystemWriter (a BlockingAsyncStager) stages with in dcp.async_save.
from torch.distributed._state_dict_utils import _copy_state_dict, _create_cpu_state_dict
from torch.distributed.checkpoint import DefaultSavePlanner
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)
from torch.distributed.tensor import DTensor

from hpcml.compute.checkpoint.hashing_fs import HashingFileSystem
from hpcml.compute.checkpoint.layout import (
    SHARDED,
    STATE_FILE,
    BackgroundPruner,
    CheckpointCorruptError,
    commit,
    file_entry,
    partial_dir,
    rng_file,
)
from hpcml.compute.checkpoint.replicated import StagingArea, without_zip_crc32
from hpcml.compute.dist import DistributedContext
from hpcml.errors import ConfigError, HpcmlError
from hpcml.fileio import FileDigest, fsync_dir, write_hashed

log = logging.getLogger(__name__)

# The folder, inside step-<N>, that DCP writes: `.metadata` (rank 0) and one `__<rank>_<n>.distcp` per rank.
SHARDS_DIR = "shards"
# The training state that goes through DCP in this layout; the rest stays in train_state.pt.
SHARDED_STATE = ("model", "optimizer")


def sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The model's and optimizer's state, keyed by parameter name: this rank's shards under FSDP, whole
    tensors otherwise (every rank calls it, at the same step boundary)."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optimizer_state}


class StateByName:
    """sharded_state(model, optimizer), read without re-deriving every parameter's name at every save.

    torch's get_state_dict walks the model for each parameter's name on every call, a third of an asynchronous
    save's stall (docs/PERFORMANCE.md), though the names do not change in a run. The first read asks torch and
    checks that its answer is `model.state_dict()` as it is, with the optimizer's parameter indices replaced
    by names (what it is for fully_shard's modules and plain ones). Later reads do just that renaming, while
    the model and the optimizer hold the same parameters in the same order; anything else asks torch again.
    Where torch's answer is more than a renaming (a wrapped or compiled model renames keys), every read asks
    torch. torch's set-up of an empty optimizer state (a zero step) happens at the first read, before any
    later one: a run's optimizer state is never emptied once it exists.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer
        self._params: list[torch.Tensor] | None = None  # the parameters when torch was last asked
        self._names: list[str] | None = None  # torch's name for each optimizer parameter; None: not a renaming

    def read(self) -> dict[str, Any]:
        """This rank's model and optimizer state, keyed by parameter name, as sharded_state returns it."""
        params = self._parameters()
        if (
            self._params is not None
            and len(params) == len(self._params)
            and all(map(operator.is_, params, self._params))
        ):
            return self._renamed(self._names) if self._names is not None else sharded_state(self.model, self.optimizer)
        state = sharded_state(self.model, self.optimizer)
        names = [name for group in state["optimizer"]["param_groups"] for name in group["params"]]
        # Only an answer that renaming alone reproduces is learned. Both read the same values (views of the live
        # tensors, the optimizer's own per-parameter state and group settings): the keys decide.
        renames = len(names) == sum(len(g["params"]) for g in self.optimizer.param_groups) and _keys(
            self._renamed(names)
        ) == _keys(state)
        if not renames and self._params is None:
            log.info("sharded saves read the state through torch's get_state_dict at every save (it renames keys)")
        self._params, self._names = params, (names if renames else None)
        return state

    def _parameters(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]] + list(self.model.parameters())

    @torch.no_grad()
    def _renamed(self, names: list[str]) -> dict[str, Any]:
        # torch.optim numbers the parameters across its groups in order, as optimizer.state_dict() keys them.
        optimizer = self.optimizer.state_dict()
        return {
            "model": self.model.state_dict(),
            "optimizer": {
                "state": {names[index]: value for index, value in optimizer["state"].items()},
                "param_groups": [
                    {**group, "params": [names[index] for index in group["params"]]}
                    for group in optimizer["param_groups"]
                ],
            },
        }


def _keys(state: dict[str, Any]) -> tuple:
    """A model-and-optimizer state's keys, in order: the model's, the optimizer's, its parameters' and each
    group's parameter names."""
    optimizer = state["optimizer"]
    return (
        list(state["model"]),
        list(optimizer),
        list(optimizer.get("state", {})),
        [group.get("params") for group in optimizer.get("param_groups", [])],
    )


def shard_entries(written: dict[Path, FileDigest], partial: Path) -> dict[str, dict[str, Any]]:
    """The manifest's lines for `written`, the files a rank wrote into the `partial` folder's shards; a file
    written anywhere else fails the save (the manifest names shards by their place in the folder)."""
    shards = partial / SHARDS_DIR
    if any(path.parent != shards for path in written):
        raise CheckpointCorruptError(
            f"DCP wrote {sorted(map(str, written))}, not all of it in {shards}; not committing {partial.name}. "
            "The previous checkpoint stays the newest (a torch upgrade may have changed where DCP puts its files)."
        )
    return {f"{SHARDS_DIR}/{path.name}": file_entry(digest) for path, digest in written.items()}


@dataclass(frozen=True)
class ShardedSave:
    """One sharded checkpoint to write: this rank's `shards` and `rng_state`; `rest`, the replicated state, on
    rank 0 (None elsewhere). Rank 0 gathers every rank's RNG state while committing, and writes them."""

    step: int
    header: dict[str, Any]
    shards: dict[str, Any]
    rest: dict[str, Any] | None
    rng_state: dict[str, Any]


class ShardStaging:
    """CPU copies of this rank's shards for asynchronous saves, allocated at the first save and refilled by
    every save after it, as StagingArea does for the rest (a buffer is never refilled while a write still
    reads it: the writer waits for the previous save first). DCP's default staging allocates afresh each time,
    deep-copying every DTensor: 0.18-0.23 s per save of a 40 MB state on 4 ranks here, against 4-9 ms to
    refill the buffers (measured). `pin`: page-locked buffers, for copies from a GPU."""

    def __init__(self, pin: bool = False) -> None:
        self.pin = pin
        self._buffers: dict[str, Any] | None = None

    def copy(self, shards: dict[str, Any]) -> dict[str, Any]:
        """A copy of `shards` in this area's buffers (made anew when the state's layout changed)."""
        if self._buffers is None or not _same_layout(shards, self._buffers):
            self._buffers = _own_buffers(_create_cpu_state_dict(shards, pin_memory=self.pin), shards)
        # A blocking copy (non_blocking=False): from a GPU too, the buffers hold this step's state on return.
        return _copy_state_dict(shards, self._buffers, non_blocking=False, type_check=False)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    # The shard itself, read as torch's own staging reads it (_create_cpu_state_dict): to_local() goes through
    # autograd, about 25 us a tensor; comparing the layouts of the 40 MB LM's state (hundreds of tensors) took
    # 7 ms of an asynchronous save's 35 ms stall on 4 ranks with it (measured).
    return tensor._local_tensor if isinstance(tensor, DTensor) else tensor


def _same_layout(live: Any, staged: Any) -> bool:
    """Whether `staged` has `live`'s structure, and tensors of its local shapes and dtypes."""
    if isinstance(live, torch.Tensor):
        if not isinstance(staged, torch.Tensor):
            return False
        mine, theirs = _local(live), _local(staged)
        return mine.shape == theirs.shape and mine.dtype == theirs.dtype
    if isinstance(live, dict):
        return (
            isinstance(staged, dict)
            and live.keys() == staged.keys()
            and all(_same_layout(v, staged[k]) for k, v in live.items())
        )
    if isinstance(live, (list, tuple)):
        return (
            isinstance(staged, (list, tuple))
            and len(live) == len(staged)
            and all(_same_layout(a, b) for a, b in zip(live, staged, strict=True))
        )
    return True


def _own_buffers(staged: Any, live: Any) -> Any:
    """`staged` with a copy of its own wherever _create_cpu_state_dict handed back the live tensor itself (it
    does for a 0-dim DTensor): a buffer shared with training would be saved with a later step's value."""
    if isinstance(staged, torch.Tensor):
        return copy.deepcopy(live.detach()) if staged is live else staged
    if isinstance(staged, dict):
        return {k: _own_buffers(v, live[k]) for k, v in staged.items()}
    if isinstance(staged, (list, tuple)):
        return type(staged)(_own_buffers(a, b) for a, b in zip(staged, live, strict=True))
    return staged


class ShardedCheckpointWriter:
    """Writes sharded checkpoints, every rank its shard: inline, or (`asynchronous`) from a copy of the state
    made at the step boundary, by a background thread on every rank that writes, hashes and commits over a
    process group of its own (gloo: a save's collectives never interleave with training's). The training
    thread then makes no collective call for a save at all. Never two saves in flight. `before_commit` is
    called on every rank with the partial folder once its shard is durable (fault drills)."""

    def __init__(
        self,
        directory: Path,
        keep_last: int,
        asynchronous: bool,
        ctx: DistributedContext,
        before_commit: Callable[[Path], None] = lambda partial: None,
        timeout_s: float = 300.0,
    ):
        self.directory, self.keep_last, self.asynchronous, self.ctx = directory, keep_last, asynchronous, ctx
        self.before_commit = before_commit
        # A collective: every rank builds its writer at the same point. DCP's own asynchronous save crashed or
        # hung on the training's group (measured); on a group of its own it does not.
        # Its collectives time out as the training's do (train.dist_timeout_s), not after torch's 30 minutes.
        self.group = (
            dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s)) if asynchronous else None
        )
        # One thread kept for every save: starting a thread per save cost up to 30 ms on a loaded machine.
        self._executor = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="hpcml-sharded-checkpoint") if asynchronous else None
        )
        self._shard_staging, self._rest_staging = ShardStaging(pin=ctx.device.type == "cuda"), StagingArea()
        self._pending: Future | None = None
        self._pruner = BackgroundPruner(directory, keep_last)  # rank 0's
        self.last_committed: Path | None = None
        self.last_write_s: float | None = None

    def submit(self, save: ShardedSave, wait: bool) -> None:
        """Write `save` (every rank calls it at the same step boundary). Inline, or from a copy handed to the
        background thread; `wait` returns only when it is committed."""
        self.wait()  # the previous save is committed (or has failed) before the next starts
        self._pruner.wait()  # and the deletions that followed it (a prune removes partial folders)
        started = time.perf_counter()
        partial = partial_dir(self.directory, save.step)
        if self.ctx.is_main:  # here, not on the thread: a folder that cannot be made fails this save, at once
            self.directory.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)
            (partial / SHARDS_DIR).mkdir(parents=True)
        if not self.asynchronous:
            self._write(save, started)
            return
        # The copy is made here, at the step boundary: training may change the live state once this returns.
        rest = self._rest_staging.copy(save.rest) if save.rest is not None else None
        staged = ShardedSave(save.step, save.header, self._shard_staging.copy(save.shards), rest, save.rng_state)
        self._pending = self._executor.submit(self._write, staged, started)
        if wait:
            self.wait()

    def _write(self, save: ShardedSave, started: float) -> None:
        """Every rank: DCP writes its shard into the step's partial folder (rank 0 has made it), then the commit."""
        partial = partial_dir(self.directory, save.step)
        self._barrier()  # the folder exists, empty, before any rank writes into it
        # sync_files: DCP fsyncs each file it writes, so a shard is durable before its checksum is sent. A tensor
        # every rank holds whole (a BatchNorm buffer) is saved once, from rank 0, whose copy the run treats as
        # the true one; DCP's default would take it from whichever rank had written least so far.
        writer = dcp.FileSystemWriter(partial / SHARDS_DIR, sync_files=True)
        writer.fs = HashingFileSystem()  # what this rank writes (its data files; the metadata on rank 0), hashed
        planner = DefaultSavePlanner(dedup_save_to_lowest_rank=True)
        # DCP writes every tensor with torch.save, whose CRC-32s the manifest's checksum of each shard file
        # makes redundant (as for the replicated writer).
        with without_zip_crc32():
            dcp.save(save.shards, storage_writer=writer, planner=planner, process_group=self.group)
        self._commit(partial, save, writer.fs.digests, started)

    def _commit(self, partial: Path, save: ShardedSave, written: dict[Path, FileDigest], started: float) -> None:
        """Every rank sends the checksums of the files it wrote (`written`, hashed as DCP wrote them), with its
        RNG state, to rank 0, which writes the replicated rest and every rank's RNG state and commits; no rank
        returns before the commit (when rank 0 fails to commit, the others wait at the last barrier until the
        job is ended)."""
        mine = shard_entries(written, partial)
        self.before_commit(partial)
        gathered = [(mine, save.rng_state)]
        if self.ctx.world_size > 1:
            gathered = [None] * self.ctx.world_size if self.ctx.is_main else None
            dist.gather_object((mine, save.rng_state), gathered, dst=0, group=self.group)
        if self.ctx.is_main:
            files = {name: entry for rank_files, _ in gathered for name, entry in rank_files.items()}
            on_disk = {f"{SHARDS_DIR}/{p.name}" for p in (partial / SHARDS_DIR).iterdir()}
            if on_disk != set(files):
                # A file no rank accounted for would go unverified: refuse to commit rather than trust it.
                raise CheckpointCorruptError(
                    f"{partial.name}: the shard files on disk ({sorted(on_disk)}) are not the ones the ranks wrote "
                    f"({sorted(files)}); not committing it. The previous checkpoint stays the newest; if this "
                    "repeats, check that checkpoint.dir is one shared filesystem that every node sees."
                )
            fsync_dir(partial / SHARDS_DIR)  # the shards' directory entries, before the manifest vouches for them
            contents = {STATE_FILE: save.rest, **{rng_file(rank): rng for rank, (_, rng) in enumerate(gathered)}}
            with without_zip_crc32():
                for name, obj in contents.items():
                    files[name] = file_entry(write_hashed(partial / name, lambda f, obj=obj: torch.save(obj, f)))
            self.last_committed = commit(partial, save.step, {"layout": SHARDED, **save.header}, files)
            self._pruner.start()
            self.last_write_s = time.perf_counter() - started
            log.info("checkpoint %s committed in %.2fs (sharded)", self.last_committed.name, self.last_write_s)
        self._barrier()  # no rank goes on believing a save done that rank 0 could not commit

    def _barrier(self) -> None:
        if self.ctx.world_size > 1:
            dist.barrier(group=self.group)

    def wait(self) -> None:
        """Until the save in flight, if any, is committed; raises (once) what made it fail."""
        if self._pending is None:
            return
        # An interrupt while waiting propagates as it is, and the save stays in flight: its buffers busy.
        err = self._pending.exception()
        self._pending = None
        if err is not None:
            raise HpcmlError(f"writing a sharded checkpoint to {self.directory} failed: {err}") from err

    def close(self) -> None:
        """Until the last save is committed and the checkpoints it made old are deleted."""
        try:
            self.wait()
        finally:
            self._pruner.wait()


def load_sharded_into(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load `path`'s model and optimizer shards into `model` and `optimizer`, resharded to this run's world
    size, or whole into an unsharded model (a collective: every rank calls it)."""
    # torch lays out an optimizer's empty state (what DCP then fills) only for parameters without gradients:
    # the flat gradient sync's gradients are views that exist from the start, so they step aside meanwhile.
    grads = [(p, p.grad) for p in model.parameters()]
    for p, _ in grads:
        p.grad = None
    try:
        state = sharded_state(model, optimizer)
    finally:
        for p, grad in grads:
            p.grad = grad
    dcp.load(state, checkpoint_id=path / SHARDS_DIR)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def load_whole_into(
    model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, optimizer_state: dict
) -> None:
    """A replicated checkpoint's whole model and optimizer state (every rank holds it) into a sharded model:
    each rank keeps its own shard. The optimizer state is keyed by parameter index there (torch's
    `Optimizer.state_dict()`), and by parameter name here."""
    whole = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=whole)
    set_optimizer_state_dict(model, optimizer, keyed_by_name(optimizer_state, model), options=whole)


def keyed_by_name(optimizer_state: dict, model: nn.Module) -> dict:
    """An optimizer state dict keyed by parameter index, keyed by parameter name instead: the optimizer was
    built on `model.parameters()`, so index i is the i-th named parameter."""
    names = [name for name, _ in model.named_parameters()]
    ids = [i for group in optimizer_state["param_groups"] for i in group["params"]]
    if len(ids) != len(names):
        raise ConfigError(
            f"the checkpoint's optimizer holds {len(ids)} parameters, this model has {len(names)}: it was written "
            "for another model. Resume with the model it was written with, or start fresh with checkpoint.resume=none."
        )
    return {
        "state": {names[i]: value for i, value in optimizer_state["state"].items()},
        "param_groups": [
            {**group, "params": [names[i] for i in group["params"]]} for group in optimizer_state["param_groups"]
        ],
    }
