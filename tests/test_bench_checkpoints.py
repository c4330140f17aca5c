"""The checkpoint benchmark judges an async save by its whole cost to training (blocked time plus the
writer thread's contention), reports the blocked time beside it, and lets the last write land in training
time."""

import pytest

from hpcml.bench import checkpoints
from hpcml.compute import checkpoint as ckpt


def rounds(**per_round):
    names = ("disk_write", "disk_read", "save", "load", "sync_stall", "async_stall", "sync_slowdown", "async_slowdown")
    return {name: per_round.get(name, [1.0, 1.0, 1.0]) for name in names}


def test_the_async_target_is_on_the_slowdown_and_the_blocked_time_is_reported_beside_it():
    # Blocked for next to nothing, yet the writer thread slows training by half a sync save: a miss.
    m = {
        "bytes": 64 << 20,
        "rounds_s": rounds(async_stall=[0.0, 0.001, 0.002], async_slowdown=[0.4, 0.5, 0.6], sync_slowdown=[1.0] * 3),
    }
    by_name = {f.name.split(",")[0]: f for f in checkpoints.figures_for(m)}
    slowdown = by_name["training slowdown per async save (blocked + writer contention)"]
    assert slowdown.target == 10.0 and slowdown.met is False and slowdown.goodness == pytest.approx(2.0)
    blocked = by_name["training blocked per async save"]
    assert blocked.target is None and blocked.value == pytest.approx(0.001)
    assert blocked.value_rounds[0] == checkpoints.MEASURABLE_S  # nothing measurable, but a ratio still exists
    assert {f.rounds for f in by_name.values()} == {3}


def test_the_loop_runs_on_after_its_last_save(tmp_path, monkeypatch):
    loop = checkpoints.TrainingLoop(1 << 16)
    steps, submitted = [], []
    step, submit = loop.step, ckpt.CheckpointWriter.submit
    monkeypatch.setattr(loop, "step", lambda before_update: steps.append(1) or step(before_update))
    monkeypatch.setattr(
        ckpt.CheckpointWriter,
        "submit",
        lambda self, snap, stage=False: submitted.append(snap.step) or submit(self, snap, stage),
    )
    elapsed, blocked = checkpoints.training_loop(tmp_path / "async", loop, True, saves=2, gap=3)
    assert submitted == [3, 6] and len(steps) == 9  # a gap of steps after the last save, as after the others
    assert elapsed > 0 and blocked >= 0
    steps.clear()
    checkpoints.training_loop(tmp_path / "none", loop, None, saves=2, gap=3)
    assert len(steps) == 9  # the loop without saves runs as many steps
