"""Garbage collection at step boundaries: automatic collection off while fit's loop runs, a collection at every
N-th step (young; every FULL_EVERY-th one full), automatic collection restored afterwards, even when the loop
fails, and on in the DataLoader workers forked meanwhile."""

import gc

import pytest
import torch
from torch.utils.data import Dataset

from hpcml.compute.data import GlobalBatchStream
from hpcml.compute.loader import BatchSource
from hpcml.compute.step_gc import FULL_EVERY, StepAlignedGC
from hpcml.compute.trainer import Trainer
from hpcml.config import LoaderConfig, TrainConfig, TrainJobConfig
from hpcml.errors import ConfigError

SGD = {"_target_": "torch.optim.SGD", "lr": 0.05}


@pytest.fixture(autouse=True)
def automatic_collection_as_it_was():
    was = gc.isenabled()
    gc.enable()
    yield
    (gc.enable if was else gc.disable)()


@pytest.fixture
def collections():
    """The generation of each collection that starts while the test runs, in order."""
    seen: list[int] = []

    def record(phase, info):
        if phase == "start":
            seen.append(info["generation"])

    gc.callbacks.append(record)
    yield seen
    gc.callbacks.remove(record)


def test_collects_at_every_nth_step_young_and_every_tenth_time_in_full(collections):
    every = 3
    by_step = {}
    with StepAlignedGC(every) as step_gc:
        assert not gc.isenabled()
        for step in range(1, 2 * every * FULL_EVERY + 2):
            before = len(collections)
            step_gc.step_ended(step)
            if len(collections) > before:
                by_step[step] = collections[before:]
    assert gc.isenabled()
    assert by_step == {
        step: [2 if step % (every * FULL_EVERY) == 0 else 1] for step in range(every, 2 * every * FULL_EVERY + 1, every)
    }


def test_zero_leaves_pythons_automatic_collection_and_collects_nothing_itself(collections):
    with StepAlignedGC(0):
        assert gc.isenabled()
    gc.disable()  # so that only the policy could collect below
    with StepAlignedGC(0) as step_gc:
        for step in range(1, 1000):
            step_gc.step_ended(step)
    assert collections == []


def test_a_process_whose_automatic_collection_was_off_keeps_it_off():
    gc.disable()
    with StepAlignedGC(5):
        pass
    assert not gc.isenabled()


def fit_config(out, **train) -> TrainJobConfig:
    return TrainJobConfig(optim=SGD, train=TrainConfig(steps=6, global_batch_size=32, output_dir=str(out), **train))


def test_fit_turns_automatic_collection_off_for_its_loop_only_and_collects_at_its_steps(
    process_group, tmp_path, collections
):
    trainer = Trainer(fit_config(tmp_path, gc_every_steps=2), process_group)
    seen = []  # at each step's end (the hooks run before the step's collection): automatic?, collections so far
    trainer.after_step.append(lambda t: seen.append((t.step, gc.isenabled(), len(collections))))
    trainer.fit()
    assert [automatic for _, automatic, _ in seen] == [False] * 6
    assert gc.isenabled()
    counts = [count for _, _, count in seen]
    # One collection after step 2 and one after step 4, seen by the hooks of steps 3 and 5.
    assert [b - a for a, b in zip(counts, counts[1:], strict=False)] == [0, 1, 0, 1, 0]


def test_a_loop_that_fails_leaves_automatic_collection_on(process_group, tmp_path):
    trainer = Trainer(fit_config(tmp_path), process_group)

    def fail(t):
        if t.step == 3:
            raise RuntimeError("a user's hook failed")

    trainer.after_step.append(fail)
    with pytest.raises(RuntimeError, match="a user's hook failed"):
        trainer.fit()
    assert gc.isenabled()


class CollectorState(Dataset):
    """Each sample: whether automatic garbage collection is on in the process that reads it."""

    def __len__(self):
        return 64

    def __getitem__(self, index):
        return {"automatic_gc": torch.tensor(gc.isenabled())}


def test_loader_workers_forked_while_the_rank_collects_at_steps_collect_automatically():
    source = BatchSource(
        CollectorState(), GlobalBatchStream(64, 8, 0), 0, 1, torch.device("cpu"), 0, LoaderConfig(num_workers=1), 4
    )
    try:
        with StepAlignedGC(50):
            (batch,) = source.next_batch(0)  # the worker is forked here, with the rank's automatic collection off
            assert not gc.isenabled()
        assert batch["automatic_gc"].all()
    finally:
        source.close()


def test_a_negative_interval_is_refused():
    with pytest.raises(ConfigError, match=r"^train.gc_every_steps=-1 cannot be negative"):
        TrainConfig(gc_every_steps=-1)
