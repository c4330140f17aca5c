"""The replicated layout (DDP, one process): rank 0 writes the whole training state and every rank's RNG state
into one checkpoint folder, committed as layout.py describes.

Files are loaded with `weights_only=True`: never runs code. Verification reads each file once; loading then
maps it (`mmap=True`) from the page cache the verification just filled, instead of reading and copying it a
second time.

With `async_save`, a background thread on rank 0 copies the state to CPU and then writes it; only one
write is ever in flight. The copy overlaps the next step's forward and backward, which read the weights
but do not change them: the trainer calls `wait_staged()` before anything that does (optimizer step,
or a forward that updates buffers). Other ranks never touch the disk when saving.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hpcml.compute.checkpoint.layout import (
    REPLICATED,
    STATE_FILE,
    BackgroundPruner,
    CheckpointCorruptError,
    commit,
    file_entry,
    layout_of,
    list_checkpoints,
    partial_dir,
    read_manifest,
    rng_file,
    verify_checkpoint,
)
from hpcml.errors import HpcmlError
from hpcml.fileio import write_hashed

log = logging.getLogger(__name__)


class StagingArea:
    """CPU copies of the training state for asynchronous saves, kept from one save to the next.

    Allocating a fresh copy of a large state every save costs page faults that take longer than the copy
    itself. The writer allows one write in flight and waits for it before the next, so a buffer is never
    refilled while it is still being written.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple, torch.Tensor] = {}

    def copy(self, obj: Any, path: tuple = ()) -> Any:
        """A copy of `obj` whose tensors live in this area's buffers (same structure, same values)."""
        if isinstance(obj, torch.Tensor):
            source = obj.detach()
            buffer = self._buffers.get(path)
            if buffer is None or buffer.shape != source.shape or buffer.dtype != source.dtype:
                buffer = torch.empty(source.shape, dtype=source.dtype, pin_memory=source.is_cuda)
                self._buffers[path] = buffer
            return buffer.copy_(source)
        if isinstance(obj, dict):
            return {k: self.copy(v, (*path, k)) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(self.copy(v, (*path, i)) for i, v in enumerate(obj))
        return obj


def holds_gpu_tensors(obj: Any) -> bool:
    if isinstance(obj, torch.Tensor):
        return obj.device.type != "cpu"
    if isinstance(obj, dict):
        return any(holds_gpu_tensors(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(holds_gpu_tensors(v) for v in obj)
    return False


@dataclass(frozen=True)
class Snapshot:
    """Everything one checkpoint holds. Detached from live tensors (`snapshot(copy=True)`), or live until
    an asynchronous writer has staged it (`CheckpointWriter.submit(stage=True)`)."""

    step: int
    samples_consumed: int
    global_batch_size: int
    world_size: int
    train_state: dict[str, Any]
    rng_states: list[dict[str, Any]]


@dataclass(frozen=True)
class LoadedCheckpoint:
    path: Path
    manifest: dict[str, Any]
    train_state: dict[str, Any]
    rng_state: dict[str, Any] | None

    @property
    def step(self) -> int:
        return int(self.manifest["step"])

    @property
    def samples_consumed(self) -> int:
        return int(self.manifest["samples_consumed"])

    @property
    def layout(self) -> str:
        return layout_of(self.manifest)


# ---------------------------------------------------------------- writing


@contextlib.contextmanager
def without_zip_crc32():
    """torch.save computes a CRC-32 of every record, a large share of its time; the manifest's checksum
    already covers every byte, so the checkpoint writer skips it and restores the setting."""
    previous = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(previous)


def write_checkpoint(directory: Path, snap: Snapshot) -> Path:
    """Write and commit one checkpoint; returns the published `step-<N>` folder."""
    partial = partial_dir(directory, snap.step)
    directory.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    files: dict[str, dict[str, Any]] = {}
    contents = {STATE_FILE: snap.train_state, **{rng_file(rank): rng for rank, rng in enumerate(snap.rng_states)}}
    with without_zip_crc32():
        for name, obj in contents.items():
            files[name] = file_entry(write_hashed(partial / name, lambda f, obj=obj: torch.save(obj, f)))
    header = {
        "layout": REPLICATED,
        "samples_consumed": snap.samples_consumed,
        "global_batch_size": snap.global_batch_size,
        "world_size": snap.world_size,
    }
    return commit(partial, snap.step, header, files)


# ---------------------------------------------------------------- verifying and loading


def verify_and_load(path: Path, rank: int, device: torch.device) -> LoadedCheckpoint:
    """`verify_checkpoint` and `load_checkpoint` at once: a thread hashes the files while this one loads
    them, so the disk is read once at its own pace and the copy to the device overlaps it. What was loaded
    is returned only if every file verifies."""
    manifest = read_manifest(path)  # sizes first: the load maps the files
    outcome: dict[str, BaseException] = {}

    def verify() -> None:
        try:
            verify_checkpoint(path)
        except BaseException as err:
            outcome["error"] = err

    verifier = threading.Thread(target=verify, name="hpcml-verify", daemon=True)
    verifier.start()
    try:
        loaded = load_checkpoint(path, manifest, rank, device)
    except Exception as load_error:
        verifier.join()
        if "error" in outcome:  # a corrupt file can fail to unpickle before its hash is done: say which
            raise outcome["error"] from load_error
        raise
    verifier.join()
    if "error" in outcome:
        raise outcome["error"]
    return loaded


def load_latest_verified(directory: Path, rank: int, device: torch.device) -> LoadedCheckpoint | None:
    """The newest checkpoint that verifies, loaded; corrupt ones are skipped with a log line saying why."""
    for path in list_checkpoints(directory):
        try:
            return verify_and_load(path, rank, device)
        except CheckpointCorruptError as err:
            log.warning("skipping checkpoint %s; falling back to an older one", err)
    return None


def load_checkpoint(path: Path, manifest: dict[str, Any], rank: int, device: torch.device) -> LoadedCheckpoint:
    # mmap: the verification pass just read these pages; map them rather than read and copy them again.
    # Checkpoint files are never modified in place (a re-save replaces the folder), so the mapping is stable.
    state = torch.load(path / STATE_FILE, map_location=device, weights_only=True, mmap=True)
    rng_path = path / rng_file(rank)
    # A rank that did not exist when the checkpoint was written (resume at a larger world size) keeps its
    # freshly seeded generators.
    rng = torch.load(rng_path, weights_only=True) if rng_path.is_file() else None
    return LoadedCheckpoint(path, manifest, state, rng)


# ---------------------------------------------------------------- asynchronous writer


class CheckpointWriter:
    """Writes snapshots on rank 0, inline or on one background thread; never two writes in flight."""

    def __init__(self, directory: Path, keep_last: int, asynchronous: bool):
        self.directory = directory
        self.keep_last = keep_last
        self.asynchronous = asynchronous
        self._thread: threading.Thread | None = None
        self._staged = threading.Event()
        self._staged.set()
        self._staging = StagingArea()
        self._error: BaseException | None = None
        self._pruner = BackgroundPruner(directory, keep_last)
        self.last_write_s: float | None = None
        self.last_committed: Path | None = None

    def submit(self, snap: Snapshot, stage: bool = False) -> None:
        """Write `snap`. With `stage` (asynchronous writers only) its tensors may still be live: the
        background thread copies them first, and the caller must `wait_staged()` before changing them."""
        self.wait()  # the previous write finishes before the next starts
        self._pruner.wait()  # and the deletions that followed it (a prune removes partial folders)
        if self.asynchronous:
            self._staged.clear()
            self._thread = threading.Thread(
                target=self._write, args=(snap, stage), name="hpcml-checkpoint", daemon=False
            )
            self._thread.start()
        else:
            # GPU state goes through the pinned staging buffers here too: torch.save would otherwise copy
            # every tensor into freshly allocated pageable memory, which makes the save far slower.
            self._write(snap, stage=holds_gpu_tensors(snap.train_state))
            self._raise_if_failed()

    def prepare(self, train_state: dict[str, Any]) -> None:
        """Allocate (and fault in) the staging buffers now, at start-up: otherwise the first save that
        stages pays for them, several times the cost of the copy, while training waits."""
        if self.asynchronous or holds_gpu_tensors(train_state):
            self._staging.copy(train_state)

    def wait_staged(self) -> None:
        """Block until the write in flight no longer reads live tensors (at once when none is)."""
        self._staged.wait()

    def _write(self, snap: Snapshot, stage: bool) -> None:
        started = time.perf_counter()
        try:
            if stage:
                try:
                    snap = dataclasses.replace(snap, train_state=self._staging.copy(snap.train_state))
                finally:
                    self._staged.set()
            self.last_committed = write_checkpoint(self.directory, snap)
            self._pruner.start()
        except BaseException as err:  # surfaced on the training thread by wait()
            self._error = err
            return
        finally:
            self._staged.set()
        self.last_write_s = time.perf_counter() - started
        log.info("checkpoint %s committed in %.2fs", self.last_committed.name, self.last_write_s)

    def wait(self) -> None:
        """Until the write in flight, if any, is committed; raises (once) what made it fail."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._raise_if_failed()

    def close(self) -> None:
        """Until the last write is committed and the checkpoints it made old are deleted."""
        try:
            self.wait()
        finally:
            self._pruner.wait()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise HpcmlError(f"writing a checkpoint to {self.directory} failed: {err}") from err


def snapshot(
    step: int,
    samples_consumed: int,
    global_batch_size: int,
    world_size: int,
    train_state: dict[str, Any],
    rng_states: list[dict[str, Any]],
    copy: bool,
) -> Snapshot:
    """`copy=True` detaches the snapshot from live tensors, as an asynchronous write needs."""
    state = StagingArea().copy(train_state) if copy else train_state
    return Snapshot(step, samples_consumed, global_batch_size, world_size, state, rng_states)
