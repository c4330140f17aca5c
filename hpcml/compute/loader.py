"""Batches for the training loop: in-memory tensors indexed directly, any other Dataset through a DataLoader.

Both follow the same world-size-independent global batch stream (data.py): step s is global batch s, and a
rank trains on its slice of it. A DataLoader's sampler yields exactly those slices, starting at the step
the run resumes from, so a resumed run (at any world size) reads the same samples in the same order.

Randomness drawn inside a Dataset's `__getitem__` (augmentation) would otherwise depend on process state:
which worker got the sample and what that worker drew before. Each sample is instead read under the random
streams it draws from (of torch, numpy, random) seeded from (train.seed, step, sample index) alone, in a
worker or in the main process, so the same sample at the same step gets the same augmentation at any world
size, with any number of workers, in an uninterrupted run and in a resumed one.
"""

from __future__ import annotations

import _random
import atexit
import functools
import queue
import random
import signal
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset, default_collate

from hpcml.compute.data import GlobalBatchStream, gather, to_device
from hpcml.config import LoaderConfig

# Keys of one sample read at one step: (step, sample index).
SampleKey = tuple[int, int]


_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """SplitMix64's finalizer: a bijection on 64-bit integers that scatters every input bit."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def sample_seed(seed: int, step: int, index: int) -> int:
    """A 63-bit seed that depends on these three numbers only. Plain integer mixing: it runs for every
    sample, where numpy's SeedSequence cost 50 us (measured), a quarter of a small sample's reading."""
    return seed_in_step(step_seed(seed, step), index)


def step_seed(seed: int, step: int) -> int:
    """sample_seed's part shared by every sample of a step: computed once a step (2.6 -> 0.9 us a sample)."""
    return _mix64(_mix64((seed + 0x9E3779B97F4A7C15) & _MASK64) ^ (step & _MASK64))


def seed_in_step(of_step: int, index: int) -> int:
    return _mix64(of_step ^ (index & _MASK64)) >> 1


# random.seed(int) is this C method on the module's own Random, then `gauss_next = None`; called directly,
# 1 us a sample less (measured).
_seed_c_random = _random.Random.seed
_MODULE_RANDOM = random.seed.__self__


def _seed_torch(value: int) -> None:
    # The CPU generator alone: torch.manual_seed also seeds every accelerator's, 280 us a sample (measured).
    torch.default_generator.manual_seed(value)


def _seed_numpy(value: int) -> None:
    np.random.seed(value % 2**32)


def _seed_random(value: int) -> None:
    _seed_c_random(_MODULE_RANDOM, value)
    _MODULE_RANDOM.gauss_next = None


# The process-wide random streams a Dataset can draw augmentation from.
SEEDED_STREAMS = ("torch", "numpy", "random")
SEEDERS = {"torch": _seed_torch, "numpy": _seed_numpy, "random": _seed_random}
# Each stream's whole state, to tell whether a sample drew from it.
STATES = {"torch": torch.get_rng_state, "numpy": lambda: np.random.get_state(legacy=False), "random": random.getstate}
assert set(SEEDERS) == set(STATES) == set(SEEDED_STREAMS)


def _same_state(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):  # numpy's: its key array among plain values
        return a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a)
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b)
    return a == b


def ignore_stop_signals(signals: tuple[int, ...], worker_id: int) -> None:
    """A DataLoader worker's first act: ignore the stop signals, then let them through (they were blocked
    across the fork: see BatchSource._start_workers). Slurm signals every process of a step, workers
    included; a worker that heard SIGTERM exited (measured: the rank then failed with "DataLoader worker
    ... killed by signal: Terminated" and the job with it), where its rank would have saved and requeued.
    The rank alone acts on a stop; its workers end with it."""
    for signum in signals:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)


class SeededSamples(Dataset):
    """`dataset`, read by (step, index) keys, each sample under random streams seeded from them alone.

    Only the streams the Dataset draws from are seeded, found out as it reads: each batch is read with the
    streams found so far seeded per sample, and the state of every other stream is compared before and after.
    When a batch drew from one left unseeded, that stream is seeded from then on and the batch is read again.
    So every batch handed on was read with each stream it draws from seeded per sample: the same samples as
    seeding all three every time, for the cost of the ones in use (measured per sample: torch 1 us, numpy 2,
    random 4; comparing the others' states, tens of us a batch). Reading a batch again calls the Dataset's
    __getitem__ again for its samples: at most once per stream, in each process. A Dataset that takes
    randomness from a stream without moving it (torch.initial_seed(), draws inside torch.random.fork_rng())
    is not seen doing so: that is for it to seed from the index.

    In the main process the caller's random state is put back after each batch (read_batch), so seeding
    samples never changes what the training step draws (dropout)."""

    def __init__(self, dataset: Any, seed: int):
        self.dataset = dataset
        self.seed = seed
        # The streams this process's samples have drawn from so far, seeded before each sample from now on.
        self.seeded_streams: list[str] = []
        self._seeders: list[Callable[[int], None]] = []
        self._step_seed = (-1, 0)  # (step, step_seed(seed, step)) of the last sample read

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: SampleKey) -> Any:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list[SampleKey]) -> list[Any]:
        """The samples of `keys` (a DataLoader's fetcher calls this for a whole batch)."""
        while True:  # at most once per stream: a stream found in use stays seeded
            unseeded = [name for name in SEEDED_STREAMS if name not in self.seeded_streams]
            before = [STATES[name]() for name in unseeded]
            samples = [self._read(key) for key in keys]
            drawn = [
                name for name, state in zip(unseeded, before, strict=True) if not _same_state(state, STATES[name]())
            ]
            if not drawn:
                return samples
            self.seeded_streams += drawn
            self._seeders = [SEEDERS[name] for name in self.seeded_streams]

    def _read(self, key: SampleKey) -> Any:
        step, index = key
        if self._step_seed[0] != step:
            self._step_seed = (step, step_seed(self.seed, step))
        value = seed_in_step(self._step_seed[1], index)
        for seed in self._seeders:
            seed(value)
        return self.dataset[index]

    def read_batch(self, keys: list[SampleKey], collate: Callable[[list[Any]], Any]) -> Any:
        """The batch of `keys`, read right here, leaving this process's random state as it was."""
        saved = (torch.get_rng_state(), np.random.get_state(), random.getstate())
        try:
            return collate(self.__getitems__(keys))
        finally:
            torch.set_rng_state(saved[0])
            np.random.set_state(saved[1])
            random.setstate(saved[2])


class RankBatchSampler(Sampler[list[SampleKey]]):
    """This rank's share of every global batch from `start_step` on, as (step, index) keys: one list per
    micro-batch, `micro_batches` of them per step."""

    def __init__(
        self, stream: GlobalBatchStream, rank: int, world_size: int, start_step: int, steps: int, micro_batches: int = 1
    ):
        self.stream, self.rank, self.world_size = stream, rank, world_size
        self.start_step, self.steps, self.micro_batches = start_step, steps, micro_batches

    def keys(self, step: int) -> list[list[SampleKey]]:
        """The keys of each micro-batch of `step`."""
        parts = self.stream.micro_batches(step, self.rank, self.world_size, self.micro_batches)
        return [[(step, int(i)) for i in part] for part in parts]

    def __iter__(self) -> Iterator[list[SampleKey]]:
        for step in range(self.start_step, self.steps):
            yield from self.keys(step)

    def __len__(self) -> int:
        return max(0, self.steps - self.start_step) * self.micro_batches


# Every loader iterator this process started, for _kill_workers_left.
_STARTED: weakref.WeakSet = weakref.WeakSet()


@atexit.register  # after multiprocessing's and torch's exit handlers are registered, so it runs before them
def _kill_workers_left() -> None:
    """At exit, multiprocessing TERMs its daemon children (DataLoader workers) and then joins them; ours
    ignore TERM (Slurm's stop is the rank's to act on), so a rank leaving while something still held a loader
    (a traceback's frames) waited for them for ever (measured). They are told to stop as torch would, and
    killed if they have not within its few seconds: what they were reading is moot by then."""
    for loader in list(_STARTED):
        _stop_workers(loader)


def _stop_workers(loader: Iterator[Any]) -> None:
    """Tell `loader`'s workers to stop, through torch's own shutdown (what the iterator's __del__ calls), and
    kill any still running after its few seconds' wait: they ignore the TERM it ends with."""
    shutdown = getattr(loader, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    for worker in getattr(loader, "_workers", ()):
        if worker.is_alive():
            worker.kill()


class BackgroundReceiver:
    """A DataLoader iterator's batches, received from its workers by a thread of this one's, up to `depth`
    ahead. Taking a ready batch from a worker costs the rank about 1 ms (measured: torch hands each tensor over
    as a file descriptor, through a connection made per batch, then unpickles it), which torch moves off the
    training thread only on GPUs, in its pin-memory thread; here it overlaps the step on every device (measured:
    the loader's share of a 5.9 ms step 19% -> 3%, the step 13% shorter). The batches and their order are
    the iterator's. A worker's error is raised by `next`, in the training thread.

    The thread takes `count` batches, the sampler's all, and never asks for one more: past the last, torch's
    iterator shuts its workers down itself, and doing that here would race close() doing it in the training
    thread (seen: a worker killed while torch still watched it, and its SIGCHLD raised in the training thread)."""

    _END = object()

    def __init__(self, loader: Iterator[Any], depth: int, count: int):
        self.loader, self.count = loader, count
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stopping = threading.Event()
        self._last: tuple[Any, BaseException | None] | None = None  # the end or the error, once taken
        self._thread = threading.Thread(target=self._receive, name="hpcml-batches", daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        try:
            for _ in range(self.count):
                if not self._put((next(self.loader), None)):
                    return
            self._put((self._END, None))
        except BaseException as err:  # handed to the training thread, which raises it
            self._put((None, err))

    def _put(self, item: tuple[Any, BaseException | None]) -> bool:
        """False once the receiver is stopping: nobody will take what is left."""
        while not self._stopping.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def __iter__(self) -> BackgroundReceiver:
        return self

    def __next__(self) -> Any:
        # After the end or an error the thread is gone: asked again, say it again (as torch's iterator does).
        batch, err = self._last or self._queue.get()
        if err is not None:
            self._last = (None, err)
            raise err
        if batch is self._END:
            self._last = (batch, None)
            raise StopIteration
        return batch

    def close(self, wait_s: float = 5.0) -> None:
        """Stop receiving, then stop the workers. The thread is let finish the batch it is reading first (its
        workers deliver it, usually within ms), and ends on seeing the stop: shut down under it, torch's
        iterator would wait for that batch until loader.timeout_s, or for ever. A worker that takes longer
        than `wait_s` is stopped anyway, and the thread, a daemon, is left to end when torch gives up."""
        self._stopping.set()
        self._thread.join(wait_s)
        _stop_workers(self.loader)


class BatchSource:
    """This rank's micro-batches of each step (one without gradient accumulation), on its device, in step
    order; `peek` reads a step's first without advancing."""

    def __init__(
        self,
        dataset: Any,
        stream: GlobalBatchStream,
        rank: int,
        world_size: int,
        device: torch.device,
        seed: int,
        cfg: LoaderConfig,
        steps: int,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        stop_signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGUSR2),
        micro_batches: int = 1,
    ):
        self.dataset, self.stream, self.rank, self.world_size, self.device = dataset, stream, rank, world_size, device
        self.micro_batches = micro_batches
        self.cfg, self.steps, self.stop_signals = cfg, steps, tuple(int(s) for s in stop_signals)
        self.collate = collate_fn or default_collate
        # In-memory tensors need no workers: indexing a whole batch at once is faster than any loader.
        self.direct = isinstance(dataset, TensorDataset) and cfg.num_workers == 0 and collate_fn is None
        self.seeded = None if self.direct else SeededSamples(dataset, seed)
        self._loader: BackgroundReceiver | None = None
        self._next_step = -1
        # Seconds spent waiting for batches since the last `take_wait_s`: the loader's share of a step.
        self._wait_s = 0.0

    def _indices(self, step: int) -> list[np.ndarray]:
        return self.stream.micro_batches(step, self.rank, self.world_size, self.micro_batches)

    def _read_here(self, step: int, indices: np.ndarray) -> Any:
        """One batch of `indices`, read in this process."""
        if self.direct:
            return gather(self.dataset, indices)
        return self.seeded.read_batch([(step, int(i)) for i in indices], self.collate)

    def peek(self, step: int) -> Any:
        """The first micro-batch of `step`, read in this process: what `next_batch` will give for it (the
        settling step)."""
        return to_device(self._read_here(step, self._indices(step)[0]), self.device)

    def next_batch(self, step: int) -> list[Any]:
        """Every micro-batch of `step`, on the device."""
        started = time.perf_counter()
        if self.direct or self.cfg.num_workers == 0:
            batches = [self._read_here(step, part) for part in self._indices(step)]
        else:
            if self._loader is None or step != self._next_step:
                self._loader = self._start_workers(step)
            batches = [next(self._loader) for _ in range(self.micro_batches)]
        self._next_step = step + 1
        batches = [to_device(batch, self.device) for batch in batches]
        self._wait_s += time.perf_counter() - started
        return batches

    def _start_workers(self, start_step: int) -> BackgroundReceiver:
        """A loader iterator from `start_step`, its workers forked with the stop signals blocked: a signal in
        the moment between a worker's fork and its ignore_stop_signals would otherwise kill it (seen in
        tests). The rank's own copy of such a signal stays pending while blocked and is handled right after.
        The receiving thread starts with them blocked too, and keeps them so: a stop signal is the training
        thread's to hear at once, not after the batch it waits for arrives. The workers are forked before
        that thread starts, and after close() let the last one end (unless its worker hung past close's wait)."""
        self.close()
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, self.stop_signals)
        try:
            loader = iter(self._make_loader(start_step))
            _STARTED.add(loader)
            return BackgroundReceiver(loader, depth=self.micro_batches, count=len(loader))
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    def close(self) -> None:
        """Stop the workers (if any) now, even if something else (a traceback) still holds the iterator."""
        receiver, self._loader = self._loader, None
        if receiver is not None:
            receiver.close()

    def __del__(self) -> None:
        # Dropped without close(): the receiving thread holds the loader, whose workers would run on.
        if getattr(self, "_loader", None) is not None:
            self.close()

    def take_wait_s(self) -> float:
        waited, self._wait_s = self._wait_s, 0.0
        return waited

    def _make_loader(self, start_step: int) -> DataLoader:
        c = self.cfg
        return DataLoader(
            self.seeded,
            batch_sampler=RankBatchSampler(
                self.stream, self.rank, self.world_size, start_step, self.steps, self.micro_batches
            ),
            num_workers=c.num_workers,
            collate_fn=self.collate,
            pin_memory=c.pin_memory and self.device.type == "cuda",
            persistent_workers=c.persistent_workers,
            prefetch_factor=c.prefetch_factor,
            multiprocessing_context=c.multiprocessing_context,
            timeout=c.timeout_s,
            worker_init_fn=functools.partial(ignore_stop_signals, self.stop_signals),
            # Starting an iterator draws the workers' base seed from this generator; from the global one it
            # would move the rank's random stream (dropout) at a resume's first step and not at step 0, and the
            # resumed run would differ. The workers' own streams do not matter: every sample is seeded.
            generator=torch.Generator().manual_seed(self.seeded.seed),
        )
