"""Verified, resumable checkpoints: `step-<N>/` folders committed by a checksum manifest written last.

Rank 0 writes every file (the replicated training state, and each rank's RNG state gathered to it) into
`.step-<N>.partial/`, fsyncs them, writes `manifest.json` (size and XXH3-128 per file) to a temporary name and
renames it, fsyncs the folder, then renames the folder to `step-<N>` and fsyncs the parent. A folder
without a valid manifest is never trusted: loading verifies every file against it and falls back to the
previous verified checkpoint, saying why. Files are loaded with `weights_only=True`: never runs code.
Verification reads each file once; loading then maps it (`mmap=True`) from the page cache the
verification just filled, instead of reading and copying it a second time.

With `async_save`, a background thread on rank 0 copies the state to CPU and then writes it; only one
write is ever in flight. The copy overlaps the next step's forward and backward, which read the weights
but do not change them: the trainer calls `wait_staged()` before anything that does (optimizer step,
or a forward that updates buffers). Other ranks never touch the disk when saving.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import random
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hpcml.errors import HpcmlError
from hpcml.fileio import CHECKSUMS, digest_of, fsync_dir, write_atomically, write_hashed

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
STATE_FILE = "train_state.pt"
FORMAT_VERSION = 1


class CheckpointCorruptError(HpcmlError):
    """A checkpoint folder failed verification (missing or partial manifest, size or checksum mismatch)."""


def rng_file(rank: int) -> str:
    return f"rng-rank{rank}.pt"


def step_dir_name(step: int) -> str:
    return f"step-{step}"


def capture_rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


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


# ---------------------------------------------------------------- writing


@contextlib.contextmanager
def _without_zip_crc32():
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
    final = directory / step_dir_name(snap.step)
    partial = directory / f".{step_dir_name(snap.step)}.partial"
    directory.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    files: dict[str, dict[str, Any]] = {}
    contents = {STATE_FILE: snap.train_state, **{rng_file(rank): rng for rank, rng in enumerate(snap.rng_states)}}
    with _without_zip_crc32():
        for name, obj in contents.items():
            digest = write_hashed(partial / name, lambda f, obj=obj: torch.save(obj, f))
            files[name] = {digest.algorithm: digest.hexdigest, "bytes": digest.size}
    manifest = {
        "format": FORMAT_VERSION,
        "step": snap.step,
        "samples_consumed": snap.samples_consumed,
        "global_batch_size": snap.global_batch_size,
        "world_size": snap.world_size,
        "saved_at": time.time(),
        "files": files,
    }
    # The manifest is the commit marker: written last, atomically, after every file is durable.
    write_atomically(partial / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=2).encode()))
    if final.exists():  # a re-save of the same step (e.g. after a resume): replace it whole
        shutil.rmtree(final)
    partial.rename(final)
    fsync_dir(directory)
    return final


def list_checkpoints(directory: Path) -> list[Path]:
    """Committed-looking `step-<N>` folders, newest first (verification happens on load)."""
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        name = path.name
        if path.is_dir() and name.startswith("step-") and name[5:].isdigit():
            found.append((int(name[5:]), path))
    return [p for _, p in sorted(found, reverse=True)]


def prune_checkpoints(directory: Path, keep_last: int) -> None:
    for old in list_checkpoints(directory)[keep_last:]:
        shutil.rmtree(old, ignore_errors=True)
    for partial in directory.glob(".step-*.partial"):  # left by a writer that was killed
        shutil.rmtree(partial, ignore_errors=True)


# ---------------------------------------------------------------- verifying and loading


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of `path` if it is readable and every file it names is there at its size (no hashing):
    after this, mapping the files cannot run past their ends."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointCorruptError(f"{path.name}: no {MANIFEST} (the save never committed)")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        int(manifest["step"]), int(manifest["samples_consumed"])
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointCorruptError(f"{path.name}: unreadable {MANIFEST}: {err}") from err
    if manifest.get("format") != FORMAT_VERSION:
        raise CheckpointCorruptError(f"{path.name}: format {manifest.get('format')}, this hpcml reads {FORMAT_VERSION}")
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointCorruptError(f"{path.name}: {name} is missing")
        if file.stat().st_size != expected["bytes"]:
            raise CheckpointCorruptError(
                f"{path.name}: {name} has {file.stat().st_size} bytes, the manifest says {expected['bytes']} (truncated?)"
            )
        if not any(a in expected for a in CHECKSUMS):
            raise CheckpointCorruptError(
                f"{path.name}: {name} has no checksum this hpcml knows ({', '.join(CHECKSUMS)})"
            )
    return manifest


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """The manifest of `path` if every file matches it; CheckpointCorruptError saying what does not."""
    manifest = read_manifest(path)
    for name, expected in manifest["files"].items():
        algorithm = next(a for a in CHECKSUMS if a in expected)
        if digest_of(path / name, algorithm) != expected[algorithm]:
            raise CheckpointCorruptError(f"{path.name}: {name} fails its {algorithm} checksum (corrupted)")
    return manifest


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
        self.last_write_s: float | None = None
        self.last_committed: Path | None = None

    def submit(self, snap: Snapshot, stage: bool = False) -> None:
        """Write `snap`. With `stage` (asynchronous writers only) its tensors may still be live: the
        background thread copies them first, and the caller must `wait_staged()` before changing them."""
        self.wait()  # the previous write finishes before the next starts
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
            prune_checkpoints(self.directory, self.keep_last)
        except BaseException as err:  # surfaced on the training thread by wait()
            self._error = err
            return
        finally:
            self._staged.set()
        self.last_write_s = time.perf_counter() - started
        log.info("checkpoint %s committed in %.2fs", self.last_committed.name, self.last_write_s)

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._raise_if_failed()

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
