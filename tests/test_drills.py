"""Fault drills hook into a Trainer from outside its loop, and only when the config asks for one."""

import os
import signal
import threading
import time
from types import SimpleNamespace

import pytest

from hpcml.compute import drills
from hpcml.compute.drills import install_fault_drills
from hpcml.compute.preempt import PreemptionGuard
from hpcml.config import FaultConfig


def fake_trainer(rank=0, step=0, sharded=False, guard=None, dist_timeout_s=300):
    return SimpleNamespace(
        step=step,
        cfg=SimpleNamespace(train=SimpleNamespace(dist_timeout_s=dist_timeout_s)),
        stop=SimpleNamespace(guard=guard),
        ctx=SimpleNamespace(rank=rank, is_main=rank == 0),
        after_step=[],
        before_save=[],
        checkpoints=SimpleNamespace(sharded=sharded, before_commit=[]),
    )


def test_a_run_that_drills_nothing_gets_no_hooks():
    trainer = fake_trainer()
    install_fault_drills(trainer, FaultConfig())
    assert trainer.after_step == [] and trainer.before_save == []


def test_raise_at_step_fails_only_the_chosen_rank_at_the_chosen_step():
    fault = FaultConfig(raise_at_step=5, rank=1)
    bystander, chosen = fake_trainer(rank=0, step=5), fake_trainer(rank=1, step=4)
    for trainer in (bystander, chosen):
        install_fault_drills(trainer, fault)
        assert len(trainer.after_step) == 1 and trainer.before_save == []
    bystander.after_step[0](bystander)  # another rank: nothing
    chosen.after_step[0](chosen)  # step 4: nothing yet
    chosen.step = 5
    with pytest.raises(RuntimeError, match="injected fault on rank 1 at step 5"):
        chosen.after_step[0](chosen)


def test_kill_during_save_hooks_into_saves_only():
    trainer = fake_trainer()
    install_fault_drills(trainer, FaultConfig(kill_during_save_at_step=150))
    assert trainer.after_step == [] and len(trainer.before_save) == 1
    trainer.before_save[0](trainer)  # step 0: not the drilled step, so this process lives on


def test_kill_during_a_sharded_save_cuts_the_chosen_ranks_shard_and_kills_it(tmp_path, monkeypatch):
    """Hooked into the sharded save's before_commit (each rank's shard is on disk by then): at the drilled step
    the chosen rank halves its own shard, leaves the others' alone, and SIGKILLs itself."""
    (tmp_path / "shards").mkdir()
    for rank in range(2):
        (tmp_path / "shards" / f"__{rank}_0.distcp").write_bytes(b"x" * 100)
    killed = []
    monkeypatch.setattr("hpcml.compute.drills.os.kill", lambda pid, sig: killed.append(sig))
    bystander, chosen = fake_trainer(rank=0, step=150, sharded=True), fake_trainer(rank=1, step=149, sharded=True)
    for trainer in (bystander, chosen):
        install_fault_drills(trainer, FaultConfig(kill_during_save_at_step=150, rank=1))
        assert trainer.before_save == [] and len(trainer.checkpoints.before_commit) == 1
    bystander.checkpoints.before_commit[0](tmp_path)  # another rank: nothing
    chosen.checkpoints.before_commit[0](tmp_path)  # step 149: nothing yet
    assert killed == []
    chosen.step = 150
    chosen.checkpoints.before_commit[0](tmp_path)
    assert killed == [signal.SIGKILL]
    sizes = [(tmp_path / "shards" / f"__{rank}_0.distcp").stat().st_size for rank in range(2)]
    assert sizes == [100, 50]


def test_a_held_step_waits_for_the_signal_and_only_at_the_steps_asked():
    """fault.hold_for_signal_at_steps: at step 4 nothing holds; at step 5 the rank waits until the TERM comes."""
    with PreemptionGuard([signal.SIGTERM]) as guard:
        trainer = fake_trainer(step=4, guard=guard)
        install_fault_drills(trainer, FaultConfig(hold_for_signal_at_steps=[5, 9]))
        started = time.monotonic()
        trainer.after_step[0](trainer)
        assert time.monotonic() - started < 0.5
        trainer.step = 5
        term = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM))
        term.start()
        try:
            trainer.after_step[0](trainer)
            held_s = time.monotonic() - started
        finally:
            term.join()  # the TERM lands while the guard still catches it, whatever happened
        assert guard.received is signal.SIGTERM and 1.0 <= held_s < 3.0, held_s


def test_a_hold_that_no_signal_ends_gives_up_at_its_limit_or_half_the_collective_timeout(monkeypatch):
    monkeypatch.setattr(drills, "HOLD_FOR_SIGNAL_LIMIT_S", 2.0)
    with PreemptionGuard([signal.SIGTERM]) as guard:
        for dist_timeout_s, (at_least_s, under_s) in ((300, (2.0, 4.0)), (0.4, (0.2, 1.5))):
            trainer = fake_trainer(step=5, guard=guard, dist_timeout_s=dist_timeout_s)
            install_fault_drills(trainer, FaultConfig(hold_for_signal_at_steps=[5]))
            started = time.monotonic()
            trainer.after_step[0](trainer)
            held_s = time.monotonic() - started
            assert at_least_s <= held_s < under_s and guard.received is None, (dist_timeout_s, held_s)
