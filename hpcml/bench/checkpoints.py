"""Checkpoint save and load throughput against the disk's own bandwidth, and the async save's stall.

In one process, in the same directory and with the same byte count:
- disk write: one buffer written with `write()` and fsynced; disk read: read back after its pages were
  dropped from the page cache (posix_fadvise DONTNEED, no root needed), so it comes from the disk;
- hpcml save: a synchronous save of a real training state (MLP + Adam) through the checkpoint writer
  training uses (for GPU state: copy into pinned host buffers), then serialise, checksum, fsync,
  manifest, rename (older checkpoints are kept while timing: the disk baseline deletes nothing either);
  hpcml load: verify the manifest's hashes while loading (onto the state's device), cache dropped first;
- what a save costs training, in a training loop of that model saving every few steps, with `async_save`
  (a thread copies the state while the next forward/backward runs, then writes it) and without: the
  slowdown per save, the loop's extra time against the same loop without saves in the same round (the
  time training is blocked plus the writer thread's contention for cores and memory bandwidth), which
  the async target judges; and, reported beside it, the time the training thread is blocked per save.
Each is measured in a few rounds that alternate all of them, so drift hits all alike; every round is
kept, and each figure is the median round with the rounds' spread.
"""

from __future__ import annotations

import math
import os
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from hpcml.bench.record import BenchResult, Figure
from hpcml.compute import checkpoint as ckpt
from hpcml.compute.models import MLP

MB = 1 << 20
CPU = torch.device("cpu")
# Below this a per-save cost is lost in a loop's noise; a ratio needs something above zero.
MEASURABLE_S = 1e-4


def drop_from_page_cache(path: Path) -> None:
    """Make the next read of `path` come from the disk (its pages are clean: the file was fsynced)."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


class TrainingLoop:
    """An MLP with Adam whose training state (parameters, moments: about 3x the parameters) is roughly
    `target_bytes`."""

    def __init__(self, target_bytes: int, batch: int = 32, device: torch.device = CPU):
        width = max(64, int((target_bytes / 4 / 3 / 3) ** 0.5))  # 3 square layers, 3 copies (params, m, v)
        self.model = MLP(input_dim=width, num_classes=10, width=width, depth=3).to(device)
        self.optimizer = torch.optim.Adam(self.model.parameters())
        self.x = torch.randn(batch, width, device=device)
        self.device = device
        self.step()

    def step(self, before_update=lambda: None) -> None:
        """One step; `before_update` runs between backward and the optimizer (as in hpcml's Trainer)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.model(self.x).sum().backward()
        before_update()
        self.optimizer.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # a step is over when the GPU is done, not when it is queued

    def state(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}


def _snapshot(state: dict, step: int, copy: bool) -> ckpt.Snapshot:
    return ckpt.snapshot(step, step, 1, 1, state, [ckpt.capture_rng_state()], copy=copy)


def disk_write(path: Path, buffer: np.ndarray) -> float:
    os.sync()  # nobody's earlier writes (or deletions) are flushed on this measurement's time
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


def hpcml_save(writer: ckpt.CheckpointWriter, state: dict, step: int) -> tuple[float, Path]:
    """One synchronous save through the writer training uses (prepared once, as Trainer.fit does)."""
    snap = _snapshot(state, step, copy=False)
    os.sync()
    started = time.perf_counter()
    writer.submit(snap)
    return time.perf_counter() - started, writer.last_committed


def hpcml_load(path: Path, device: torch.device = CPU) -> float:
    drop_from_page_cache(path)
    started = time.perf_counter()
    ckpt.verify_and_load(path, 0, device)  # as a resume does
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # loaded means on the GPU
    return time.perf_counter() - started


def training_loop(directory: Path, loop: TrainingLoop, asynchronous: bool | None, saves: int, gap: int):
    """`(saves + 1) * gap` training steps with a save after each of the first `saves` runs of `gap` steps
    (none when asynchronous is None); the last `gap` steps run with no save, so that the last async write's
    contention for the cores lands in training time, as every earlier write's does.

    Returns (loop seconds, seconds the training thread was blocked by saves). The loop ends at its last
    step: an async write still running then (the gap is sized so none should) is not training time.
    """
    writer = ckpt.CheckpointWriter(directory, keep_last=1, asynchronous=bool(asynchronous))
    writer.prepare(loop.state())  # as Trainer.fit() does before its first step
    blocked = 0.0

    def wait_staged() -> None:
        nonlocal blocked
        started = time.perf_counter()
        writer.wait_staged()
        blocked += time.perf_counter() - started

    started = time.perf_counter()
    for step in range(1, (saves + 1) * gap + 1):
        loop.step(before_update=wait_staged)
        if asynchronous is not None and step % gap == 0 and step <= saves * gap:
            submitted = time.perf_counter()
            writer.submit(_snapshot(loop.state(), step, copy=False), stage=bool(asynchronous))
            blocked += time.perf_counter() - submitted
    elapsed = time.perf_counter() - started
    writer.close()
    return elapsed, blocked


def measure(workdir: Path, target_bytes: int, repeats: int, device: torch.device = CPU) -> dict:
    scratch = workdir / "outputs" / "bench-checkpoints"  # outputs/ is ignored by git
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    threads = torch.get_num_threads()
    # One thread, as a rank runs under hpcml (cluster.env sets OMP_NUM_THREADS=1): the writer thread of an
    # async save then competes with training for the node's cores, not with torch's own thread pool.
    torch.set_num_threads(1)
    try:
        loop = TrainingLoop(target_bytes, device=device)
        state = loop.state()
        # Nothing pruned inside the timed saves: deleting the previous checkpoint is the filesystem's cost,
        # and the disk baseline deletes nothing either.
        saver = ckpt.CheckpointWriter(scratch / "ckpt", keep_last=repeats + 1, asynchronous=False)
        saver.prepare(state)
        sizing, path = hpcml_save(saver, state, 0)
        nbytes = sum(f.stat().st_size for f in path.iterdir())
        buffer = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
        into = bytearray(nbytes)
        # Leave an async write time to finish between saves: gap steps take about 3 synchronous saves.
        started = time.perf_counter()
        for _ in range(5):
            loop.step()
        step_s = (time.perf_counter() - started) / 5
        # Space the saves so that an async write (as slow as a sync one, or slower: it shares the cores)
        # can finish before the next: a save that waits for the previous one measures the disk, not the stall.
        _, write_s = training_loop(scratch / "sizing-loop", loop, False, saves=1, gap=1)
        gap, saves = max(2, math.ceil(3 * max(sizing, write_s) / step_s)), 3
        rounds: dict[str, list[float]] = {
            k: [] for k in ("disk_write", "disk_read", "save", "load", "no_save", "sync", "async")
        }
        for mode in ("sync", "async"):
            rounds[f"{mode}_stall"], rounds[f"{mode}_slowdown"] = [], []
        for i in range(repeats):
            raw = scratch / "raw.bin"
            rounds["disk_write"].append(disk_write(raw, buffer))
            rounds["disk_read"].append(disk_read(raw, into))
            raw.unlink()
            seconds, path = hpcml_save(saver, state, i + 1)
            rounds["save"].append(seconds)
            rounds["load"].append(hpcml_load(path, device))
            for mode, asynchronous in (("no_save", None), ("sync", False), ("async", True)):
                seconds, blocked = training_loop(scratch / mode, loop, asynchronous, saves, gap)
                rounds[mode].append(seconds)
                if asynchronous is not None:
                    rounds[f"{mode}_stall"].append(blocked / saves)
            # The whole cost to training, against this round's loop without saves.
            for mode in ("sync", "async"):
                rounds[f"{mode}_slowdown"].append(max(0.0, rounds[mode][-1] - rounds["no_save"][-1]) / saves)
        return {
            "bytes": nbytes,
            "repeats": repeats,
            "step_s": step_s,
            "saves": saves,
            "gap_steps": gap,
            # Medians over the rounds; every round's seconds are in rounds_s.
            **{f"{k}_s": statistics.median(v) for k, v in rounds.items()},
            "rounds_s": rounds,
        }
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(scratch, ignore_errors=True)


def figures_for(m: dict, benchmark: str = "checkpoints", where: str = "") -> list[Figure]:
    gb = m["bytes"] / 1e9
    size = f"{m['bytes'] / MB:.0f} MB state{' ' + where if where else ''}"
    r = m["rounds_s"]

    def measurable(seconds: list[float]) -> list[float]:
        return [max(s, MEASURABLE_S) for s in seconds]

    return [
        Figure.from_rounds(benchmark, f"save throughput, {size}", "GB/s", [gb / s for s in r["save"]],
                           "disk write + fsync", [gb / s for s in r["disk_write"]], higher_is_better=True, target=0.8),
        Figure.from_rounds(benchmark, f"load throughput (verify + load), {size}", "GB/s", [gb / s for s in r["load"]],
                           "disk read", [gb / s for s in r["disk_read"]], higher_is_better=True, target=0.8),
        # The target is on the whole cost to training: async at most 10% of sync, i.e. sync / async >= 10.
        Figure.from_rounds(benchmark, f"training slowdown per async save (blocked + writer contention), {size}", "s",
                           measurable(r["async_slowdown"]), "sync save", measurable(r["sync_slowdown"]),
                           higher_is_better=False, target=10.0),
        Figure.from_rounds(benchmark, f"training blocked per async save, {size}", "s", measurable(r["async_stall"]),
                           "sync save", measurable(r["sync_stall"]), higher_is_better=False),
    ]  # fmt: skip


def run(quick: bool, workdir: Path) -> BenchResult:
    target, repeats = (32 * MB, 2) if quick else (512 * MB, 3)
    result = BenchResult("checkpoints", quick, {"state_bytes_target": target, "repeats": repeats})
    m = measure(workdir, target, repeats)
    result.measurements.append(m)
    result.notes.append(
        f"slowdown per save = (loop saving every {m['gap_steps']} steps - the same loop without saves, same round) "
        f"/ {m['saves']} saves; blocked = the training thread's wait for the save, part of that slowdown"
    )
    result.figures += figures_for(m)
    return result
