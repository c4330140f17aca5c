"""Garbage collection at step boundaries: automatic collection off while fit's loop runs, a collection at every
N-th step (young; every FULL_EVERY-th one full), automatic collection during evaluations and after the loop,
even when it fails, and in every process forked meanwhile (DataLoader workers too)."""

import gc
import os

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


def test_collects_in_full_at_the_start_then_at_every_nth_step_young_and_every_tenth_time_in_full(collections):
    every = 3
    by_step = {}
    with StepAlignedGC(every) as step_gc:
        assert not gc.isenabled() and collections == [2]  # a full one at the start: the set-up's garbage
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


def child_collects_automatically() -> bool:
    """Whether a child forked now has automatic collection on (it reports it and exits at once)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(write, b"1" if gc.isenabled() else b"0")
        os._exit(0)
    os.close(write)
    answer = os.read(read, 1)
    os.close(read)
    os.waitpid(pid, 0)
    return answer == b"1"


def test_a_child_forked_meanwhile_collects_automatically_unless_its_parent_had_that_off():
    with StepAlignedGC(5):
        assert not gc.isenabled() and child_collects_automatically()
    gc.disable()
    with StepAlignedGC(5):
        assert not child_collects_automatically()


def test_paused_turns_automatic_collection_on_inside_only():
    with StepAlignedGC(5) as step_gc:
        with step_gc.paused():
            assert gc.isenabled()
        assert not gc.isenabled()
    gc.disable()
    with StepAlignedGC(5) as step_gc, step_gc.paused():
        assert not gc.isenabled()  # the process had it off: a pause does not turn it on


def fit_config(out, **train) -> TrainJobConfig:
    return TrainJobConfig(optim=SGD, train=TrainConfig(steps=6, global_batch_size=32, output_dir=str(out), **train))


def test_fit_collects_at_its_loops_steps_and_automatically_during_evaluations_and_after_the_loop(
    process_group, tmp_path, collections
):
    trainer = Trainer(fit_config(tmp_path, gc_every_steps=2, eval_every_steps=3), process_group)
    seen = []  # at each step's end (the hooks run before the step's collection): automatic?, collections so far
    trainer.after_step.append(lambda t: seen.append((t.step, gc.isenabled(), len(collections))))
    saves = []
    trainer.before_save.append(lambda t: saves.append((t.step, gc.isenabled())))
    evaluations = []
    evaluate = trainer.evaluate
    trainer.evaluate = lambda: (evaluations.append((trainer.step, gc.isenabled())), evaluate())[1]
    trainer.fit()
    assert [automatic for _, automatic, _ in seen] == [False] * 6
    counts = [count for _, _, count in seen]
    # A collection after step 2 and one after step 4, seen by the hooks of steps 3 and 5 (the evaluation
    # after step 3 ran with automatic collection on, which may collect: seen from step 4 on).
    assert (
        counts[1] == counts[0] and counts[2] == counts[1] + 1 and counts[4] == counts[3] + 1 and counts[5] == counts[4]
    )
    assert evaluations == [(3, True), (6, True)]  # the one between steps, and the final one
    assert saves[-1] == (6, True)  # the final save, after the loop
    assert gc.isenabled()


def test_a_loop_that_fails_leaves_automatic_collection_on(process_group, tmp_path):
    trainer = Trainer(fit_config(tmp_path), process_group)
    during = []

    def fail(t):
        during.append(gc.isenabled())
        if t.step == 3:
            raise RuntimeError("a user's hook failed")

    trainer.after_step.append(fail)
    with pytest.raises(RuntimeError, match="a user's hook failed"):
        trainer.fit()
    assert during == [False] * 3 and gc.isenabled()


class CollectorState(Dataset):
    """Each sample: whether automatic garbage collection is on in the process that reads it."""

    def __len__(self):
        return 64

    def __getitem__(self, index):
        return {"automatic_gc": torch.tensor(gc.isenabled())}


def test_loader_workers_forked_while_the_rank_collects_at_steps_collect_automatically():
    loader = LoaderConfig(num_workers=1, multiprocessing_context="fork")  # spawned workers would anyway
    source = BatchSource(CollectorState(), GlobalBatchStream(64, 8, 0), 0, 1, torch.device("cpu"), 0, loader, 4)
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
