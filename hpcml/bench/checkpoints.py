"""Checkpoint save and load throughput against the disk's own bandwidth, and the async save's stall.

In one process, in the same directory and with the same byte count:
- disk write: one buffer written with `write()` and fsynced; disk read: read back after its pages were
  dropped from the page cache (posix_fadvise DONTNEED, no root needed), so it comes from the disk;
- hpcml save: `write_checkpoint` of a real training state (MLP + Adam): serialise, SHA-256, fsync,
  manifest, rename; hpcml load: verify the manifest's hashes and load, with the cache dropped first;
- the training stall of a save: what the step boundary waits for with `async_save` (copy to CPU and
  hand off) against a synchronous save of the same state.
Each is the best of a few repeats, alternating, so drift hits all alike.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from hpcml import checkpoint as ckpt
from hpcml.bench.record import BenchResult, Figure
from hpcml.config import ModelConfig
from hpcml.models import build_mlp

MB = 1 << 20


def drop_from_page_cache(path: Path) -> None:
    """Make the next read of `path` come from the disk (its pages are clean: the file was fsynced)."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def training_state(target_bytes: int) -> dict:
    """Model + Adam state (about 3x the parameters) of roughly `target_bytes`."""
    width = max(64, int((target_bytes / 4 / 3 / 3) ** 0.5))  # 3 square layers, 3 copies (params, m, v)
    model = build_mlp(ModelConfig(width=width, depth=3), width, 10)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(4, width)).sum().backward()
    optimizer.step()
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict()}


def _snapshot(state: dict, step: int, copy: bool) -> ckpt.Snapshot:
    return ckpt.snapshot(step, step, 1, 1, state, [ckpt.capture_rng_state()], copy=copy)


def disk_write(path: Path, buffer: np.ndarray) -> float:
    started = time.perf_counter()
    with open(path, "wb") as f:
        f.write(memoryview(buffer))
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - started


def disk_read(path: Path, into: bytearray) -> float:
    drop_from_page_cache(path)
    started = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        view = memoryview(into)
        while view:
            n = f.readinto(view)
            if not n:
                break
            view = view[n:]
    return time.perf_counter() - started


def hpcml_save(directory: Path, state: dict, step: int) -> tuple[float, Path]:
    snap = _snapshot(state, step, copy=False)
    started = time.perf_counter()
    path = ckpt.write_checkpoint(directory, snap)
    return time.perf_counter() - started, path


def hpcml_load(path: Path) -> float:
    drop_from_page_cache(path)
    started = time.perf_counter()
    manifest = ckpt.verify_checkpoint(path)
    ckpt.load_checkpoint(path, manifest, 0, torch.device("cpu"))
    return time.perf_counter() - started


def save_stall(directory: Path, state: dict, asynchronous: bool, step: int) -> float:
    """What the step boundary waits for; an async write then finishes in the background (not counted)."""
    writer = ckpt.CheckpointWriter(directory, keep_last=1, asynchronous=asynchronous)
    started = time.perf_counter()
    writer.submit(_snapshot(state, step, copy=asynchronous))
    stall = time.perf_counter() - started
    writer.wait()
    return stall


def measure(workdir: Path, target_bytes: int, repeats: int) -> dict:
    scratch = workdir / "checkpoint-bench"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        state = training_state(target_bytes)
        _, path = hpcml_save(scratch / "sizing", state, 0)
        nbytes = sum(f.stat().st_size for f in path.iterdir())
        buffer = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
        into = bytearray(nbytes)
        best = {k: float("inf") for k in ("disk_write", "disk_read", "save", "load", "sync_stall", "async_stall")}
        for i in range(repeats):
            raw = scratch / "raw.bin"
            best["disk_write"] = min(best["disk_write"], disk_write(raw, buffer))
            best["disk_read"] = min(best["disk_read"], disk_read(raw, into))
            raw.unlink()
            seconds, path = hpcml_save(scratch / "ckpt", state, i + 1)
            best["save"] = min(best["save"], seconds)
            best["load"] = min(best["load"], hpcml_load(path))
            best["sync_stall"] = min(best["sync_stall"], save_stall(scratch / "sync", state, False, i + 1))
            best["async_stall"] = min(best["async_stall"], save_stall(scratch / "async", state, True, i + 1))
        return {"bytes": nbytes, "repeats": repeats, **{f"{k}_s": v for k, v in best.items()}}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run(quick: bool, workdir: Path) -> BenchResult:
    target, repeats = (64 * MB, 2) if quick else (512 * MB, 3)
    result = BenchResult("checkpoints", quick, {"state_bytes_target": target, "repeats": repeats})
    m = measure(workdir, target, repeats)
    result.measurements.append(m)
    gb = m["bytes"] / 1e9
    size = f"{m['bytes'] / MB:.0f} MB state"
    result.figures += [
        Figure("checkpoints", f"save throughput, {size}", "GB/s", gb / m["save_s"], "disk write + fsync",
               gb / m["disk_write_s"], higher_is_better=True, target=0.8),
        Figure("checkpoints", f"load throughput (verify + load), {size}", "GB/s", gb / m["load_s"], "disk read",
               gb / m["disk_read_s"], higher_is_better=True, target=0.8),
        # The target is on the stall: async at most 10% of sync, i.e. sync / async >= 10.
        Figure("checkpoints", f"training stall of an async save, {size}", "s", m["async_stall_s"], "sync save",
               m["sync_stall_s"], higher_is_better=False, target=10.0),
    ]  # fmt: skip
    return result
