"""Batches through a DataLoader follow the same global batch stream as in-memory tensors: the same samples,
with the same augmentation, at any world size, with any number of workers, and after a resume."""

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from user_code import Waves

from hpcml.compute.data import GlobalBatchStream
from hpcml.compute.loader import BackgroundReceiver, BatchSource, SeededSamples, sample_seed
from hpcml.config import LoaderConfig

CPU = torch.device("cpu")
STEPS = 12


def batches(dataset, world_size, workers, start=0, seed=0, micro_batches=1, cfg=None):
    """Global batches start..STEPS-1: every rank's micro-batches, concatenated in rank order."""
    stream = GlobalBatchStream(len(dataset), 32, seed)
    cfg = cfg or LoaderConfig(num_workers=workers)
    sources = [
        BatchSource(dataset, stream, rank, world_size, CPU, seed, cfg, STEPS, micro_batches=micro_batches)
        for rank in range(world_size)
    ]
    out = []
    for step in range(start, STEPS):
        parts = [micro for source in sources for micro in source.next_batch(step)]
        assert len(parts) == world_size * micro_batches
        out.append({k: torch.cat([p[k] for p in parts]) for k in parts[0]})
    for source in sources:
        source.close()
    return out


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize("world_size, workers", [(2, 0), (4, 2), (1, 2)])
def test_augmented_samples_are_the_same_at_any_world_size_and_worker_count(world_size, workers):
    data = Waves(size=200, noise=0.5)
    reference = batches(data, 1, 0)
    assert not torch.equal(reference[0]["signal"], batches(Waves(size=200), 1, 0)[0]["signal"])  # it does augment
    assert_same(batches(data, world_size, workers), reference)


class DrawsFromEveryStream:
    """A sample of draws from torch's, numpy's and `random`'s global streams; `random.gauss` draws two normals
    at a time and keeps the second for its next call, which seeding must drop."""

    def __len__(self):
        return 100

    def __getitem__(self, index):
        return torch.rand(2).tolist(), np.random.rand(2).tolist(), random.random(), random.gauss(0, 1)


def test_each_sample_is_read_under_streams_seeded_from_seed_step_and_index_alone():
    """Whatever was read before it: the sample equals a read right after seeding each stream with
    sample_seed(seed, step, index) through the libraries' own seed functions."""
    seeded = SeededSamples(DrawsFromEveryStream(), seed=5)
    keys = [(3, 17), (3, 40), (9, 17), (0, 0)]
    first = {key: seeded[key] for key in keys}
    for key in reversed(keys):  # other steps and other samples in between; each leaves a gauss cached
        value = sample_seed(5, *key)
        torch.manual_seed(value)
        np.random.seed(value % 2**32)
        random.seed(value)
        by_the_definition = DrawsFromEveryStream()[key[1]]
        assert seeded[key] == first[key] == by_the_definition, key


def by_the_definition(dataset, seed, step, index):
    """`dataset[index]` read right after seeding all three streams with sample_seed(seed, step, index)."""
    value = sample_seed(seed, step, index)
    torch.manual_seed(value)
    np.random.seed(value % 2**32)
    random.seed(value)
    return dataset[index]


class RareDraws:
    """Draws from torch for every sample, from numpy for one sample in 37, and from `random` only when that
    numpy draw is under 0.3: streams that a batch may or may not draw from."""

    def __len__(self):
        return 200

    def __getitem__(self, index):
        extra = 0.0
        if index % 37 == 36:
            extra = float(np.random.rand())
            if extra < 0.3:
                extra += 10 * random.random()
        return {"x": torch.tensor([float(index), torch.rand(1).item(), extra])}


@pytest.mark.parametrize("world_size, workers", [(1, 0), (2, 2), (4, 2)])
def test_streams_drawn_from_now_and_then_are_seeded_in_every_batch_that_draws_from_them(world_size, workers):
    """hpcml seeds only the streams a Dataset has drawn from so far, and reads a batch again when it drew from
    another: every batch still equals reading each sample right after seeding all three streams."""
    stream = GlobalBatchStream(200, 32, 0)
    expected = [
        {"x": torch.stack([by_the_definition(RareDraws(), 0, step, int(i))["x"] for i in stream.global_batch(step)])}
        for step in range(STEPS)
    ]
    assert any(out["x"][:, 2].gt(1).any() for out in expected)  # some sample drew from random, too
    assert_same(batches(RareDraws(), world_size, workers), expected)


class TorchNoise:
    """Augmentation drawn from torch's stream alone."""

    def __len__(self):
        return 200

    def __getitem__(self, index):
        return {"x": torch.full((3,), float(index)) + torch.randn(3)}


class NoDraws:
    def __len__(self):
        return 200

    def __getitem__(self, index):
        return {"x": torch.full((3,), float(index))}


def test_only_the_streams_a_dataset_draws_from_are_seeded():
    keys = [(0, i) for i in range(8)]
    for dataset, drawn in [(NoDraws(), []), (TorchNoise(), ["torch"]), (RareDraws(), ["torch"])]:
        seeded = SeededSamples(dataset, seed=0)
        seeded.__getitems__(keys)
        assert seeded.seeded_streams == drawn, type(dataset).__name__


def test_a_stream_first_drawn_when_the_batch_is_read_again_is_seeded_too():
    """RareDraws draws from `random` only after a numpy draw under 0.3. Unseeded, numpy's draw is 0.55 (numpy
    seeded with 0): the first read draws from numpy alone. Seeded, it is under 0.3 for the sample chosen here,
    so the read again draws from `random`, which must then be seeded too."""
    step = next(s for s in range(100) if by_the_definition(RareDraws(), 0, s, 36)["x"][2] > 1)
    np.random.seed(0)
    seeded = SeededSamples(RareDraws(), seed=0)
    [sample] = seeded.__getitems__([(step, 36)])
    assert seeded.seeded_streams == ["torch", "numpy", "random"]
    assert torch.equal(sample["x"], by_the_definition(RareDraws(), 0, step, 36)["x"])


@pytest.mark.parametrize("world_size, workers", [(2, 0), (2, 2)])
def test_micro_batches_split_each_ranks_share_without_changing_a_sample(world_size, workers):
    """Gradient accumulation reads the same samples with the same augmentation, in the same order."""
    data = Waves(size=200, noise=0.5)
    assert_same(batches(data, world_size, workers, micro_batches=4), batches(data, 1, 0))


def test_micro_batches_that_do_not_split_evenly_are_refused():
    from hpcml.errors import ConfigError

    with pytest.raises(ConfigError, match=r"16 samples, which do not split into train.grad_accum_steps=3"):
        GlobalBatchStream(200, 32, 0).micro_batches(0, 0, 2, 3)


def test_a_receiver_raises_a_readers_error_in_the_training_thread_and_again_if_asked_again():
    def reads():
        yield "batch 0"
        raise OSError("sample 3: input/output error")

    receiver = BackgroundReceiver(reads(), depth=1, count=3)
    assert next(receiver) == "batch 0"
    for _ in range(2):  # the thread is gone after the error: asked again, it must not wait for ever
        with pytest.raises(OSError, match="sample 3"):
            next(receiver)


def test_a_loader_asked_for_another_step_than_the_next_restarts_there_while_batches_are_in_flight():
    """The receiving thread holds batches read ahead when the loop asks for a step out of order (a settling
    step, a resume): the loader restarts at that step and gives that step's batches."""
    data = Waves(size=200, noise=0.5)
    reference = batches(data, 1, 0)
    source = BatchSource(data, GlobalBatchStream(200, 32, 0), 0, 1, CPU, 0, LoaderConfig(num_workers=2), STEPS)
    for step in (0, 1, 6, 7, 3):
        assert_same(source.next_batch(step), [reference[step]])
    source.close()


def test_a_resumed_loader_continues_the_same_stream():
    data = Waves(size=200, noise=0.5)
    assert_same(batches(data, 2, 2, start=7), batches(data, 2, 2)[7:])  # crosses the epoch boundary at step 6


def test_peek_reads_what_the_loader_delivers_and_reading_never_moves_the_callers_random_streams():
    data = Waves(size=200, noise=0.5)
    stream = GlobalBatchStream(200, 32, 0)
    source = BatchSource(data, stream, 0, 1, CPU, 0, LoaderConfig(num_workers=2), STEPS)
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    peeked = source.peek(0)
    after = torch.rand(1), np.random.rand(), random.random()
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    assert torch.equal(torch.rand(1), after[0]) and (np.random.rand(), random.random()) == after[1:]
    assert_same(source.next_batch(0), [peeked])


def test_a_worker_that_fails_fails_the_batch_with_its_error():
    source = BatchSource(
        Waves(size=64, unreadable=3), GlobalBatchStream(64, 64, 0), 0, 1, CPU, 0, LoaderConfig(num_workers=2), 1
    )
    with pytest.raises(OSError, match="sample 3: input/output error"):
        source.next_batch(0)


LEAVES_A_LOADER_HELD = """
import sys, torch
from user_code import Waves
from hpcml.compute.data import GlobalBatchStream
from hpcml.compute.loader import BatchSource
from hpcml.config import LoaderConfig

def source():
    s = BatchSource(Waves(size=64), GlobalBatchStream(64, 8, 0), 0, 1, torch.device("cpu"), 0,
                    LoaderConfig(num_workers=2), 8)
    s.next_batch(0)
    return s, s._loader.loader  # the iterator, held as a traceback's frames would hold it

closed, held = source()
closed.close()
assert not any(w.is_alive() for w in held._workers), "close() left workers running"
left, held_too = source()
print("leaving with workers running:", sum(w.is_alive() for w in held_too._workers), flush=True)
"""


def test_a_rank_never_waits_at_exit_for_workers_that_ignore_term():
    """Workers ignore TERM, which multiprocessing sends its daemon children at exit before joining them: a
    process leaving while a loader iterator is still held (as by a traceback) waited for ever. close() ends
    the workers while the iterator is held; and a process that exits without closing exits."""
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    done = subprocess.run(
        [sys.executable, "-c", LEAVES_A_LOADER_HELD], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "leaving with workers running: 2" in done.stdout
    assert "Traceback" not in done.stderr, done.stderr[-3000:]


def test_in_memory_tensors_take_the_direct_path_and_give_the_same_batches():
    tensors = torch.utils.data.TensorDataset(torch.arange(64.0).reshape(32, 2), torch.arange(32))
    stream = GlobalBatchStream(32, 8, 0)
    direct = BatchSource(tensors, stream, 1, 2, CPU, 0, LoaderConfig(), 4)
    loaded = BatchSource(tensors, stream, 1, 2, CPU, 0, LoaderConfig(num_workers=1), 4)
    assert direct.direct and not loaded.direct
    for step in range(4):
        (a,), (b,) = direct.next_batch(step), loaded.next_batch(step)
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def children_of_this_process() -> list[int]:
    return [int(pid) for f in Path("/proc/self/task").glob("*/children") for pid in f.read_text().split()]


def test_workers_outlive_the_stop_signals_slurm_sends_to_every_process_of_a_step():
    """TERM and the warning signal reach the workers too; only the rank acts on them (it saves), so a
    worker must keep delivering batches, not die and take the rank down with it."""
    import os
    import signal

    source = BatchSource(Waves(size=256), GlobalBatchStream(256, 32, 0), 0, 1, CPU, 0, LoaderConfig(num_workers=2), 8)
    before = set(children_of_this_process())
    source.next_batch(0)
    workers = set(children_of_this_process()) - before
    assert len(workers) == 2
    for pid in workers:
        os.kill(pid, signal.SIGTERM)
        os.kill(pid, signal.SIGUSR2)
    for step in range(1, 8):
        source.next_batch(step)
    source.close()
