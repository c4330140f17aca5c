"""Exact resume, in-process (one rank, gloo): an interrupted run ends bitwise equal to an uninterrupted one."""

import os
import signal

import pytest
import torch

from hpcml.compute.preempt import Deadline, PreemptionGuard, StopCoordinator, StopReason
from hpcml.compute.run_checkpoints import RunCheckpoints
from hpcml.compute.trainer import Trainer, parameters_checksum
from hpcml.config import CheckpointConfig, TrainConfig, TrainJobConfig
from hpcml.errors import ConfigError


@pytest.fixture
def ctx(process_group):
    return process_group


def config(out, steps=60, **checkpoint) -> TrainJobConfig:
    return TrainJobConfig(
        # A stateful optimizer and schedule.
        optim={"_target_": "torch.optim.Adam", "lr": 0.01},
        schedule={"_target_": "torch.optim.lr_scheduler.CosineAnnealingLR", "T_max": steps},
        train=TrainConfig(steps=steps, global_batch_size=32, output_dir=str(out)),
        checkpoint=CheckpointConfig(**checkpoint),
    )


def signal_at(step: int):
    """An after-step hook that delivers a real SIGUSR2 to this process right after `step`."""

    def hook(trainer: Trainer) -> None:
        if trainer.step == step:
            os.kill(os.getpid(), signal.SIGUSR2)

    return hook


def run_interrupted(ctx, out, at_step, **checkpoint):
    with PreemptionGuard([signal.SIGUSR2]) as guard:
        stop = StopCoordinator(guard, Deadline(None, 0), ctx.device, 1, True)
        trainer = Trainer(config(out, **checkpoint), ctx, stop)
        trainer.after_step.append(signal_at(at_step))
        return trainer.fit()


def test_interrupted_runs_end_bitwise_equal_to_an_uninterrupted_one(ctx, tmp_path):
    reference = Trainer(config(tmp_path / "ref"), ctx).fit().result.params_sha256
    out = tmp_path / "run"
    for at in (7, 23, 41):  # three interrupts, each followed by a fresh trainer that resumes
        outcome = run_interrupted(ctx, out, at)
        assert outcome.stopped is StopReason.SIGNAL and outcome.step == at
    final = Trainer(config(out), ctx).fit()
    assert final.result.resumed_from_step == 41
    assert final.result.params_sha256 == reference


def test_async_periodic_saves_resume_exactly_too(ctx, tmp_path):
    reference = Trainer(config(tmp_path / "ref"), ctx).fit().result.params_sha256
    out = tmp_path / "run"
    outcome = run_interrupted(ctx, out, 33, every_steps=5, async_save=True, keep_last=2)
    assert outcome.step == 33
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step-30", "step-33"]  # keep_last=2, periodic ones pruned
    assert Trainer(config(out), ctx).fit().result.params_sha256 == reference


def test_a_checkpoint_holding_the_old_scaler_entry_still_resumes(ctx, tmp_path, monkeypatch):
    """Earlier versions wrote "scaler": None into every train state; such checkpoints resume exactly."""
    reference = Trainer(config(tmp_path / "ref"), ctx).fit().result.params_sha256
    out = tmp_path / "run"
    current = RunCheckpoints.replicated_state
    monkeypatch.setattr(RunCheckpoints, "replicated_state", lambda self: {**current(self), "scaler": None})
    assert run_interrupted(ctx, out, 23).step == 23
    monkeypatch.undo()
    final = Trainer(config(out), ctx).fit().result
    assert final.resumed_from_step == 23 and final.params_sha256 == reference


def test_resume_none_and_explicit_path(ctx, tmp_path):
    out = tmp_path / "run"
    run_interrupted(ctx, out, 10)
    fresh = Trainer(config(out, resume="none"), ctx)
    fresh.resume()
    assert fresh.step == 0
    pinned = Trainer(config(tmp_path / "other", resume=str(out / "checkpoints" / "step-10")), ctx)
    pinned.resume()
    assert pinned.step == 10


def test_changed_global_batch_is_refused(ctx, tmp_path):
    out = tmp_path / "run"
    run_interrupted(ctx, out, 10)
    cfg = config(out)
    cfg.train.global_batch_size = 16
    with pytest.raises(ConfigError, match="same global batch"):
        Trainer(cfg, ctx).resume()


def test_a_finished_run_resumed_does_not_train_again(ctx, tmp_path):
    first = Trainer(config(tmp_path), ctx).fit().result
    again = Trainer(config(tmp_path), ctx).fit().result
    assert again.resumed_from_step == 60 and again.params_sha256 == first.params_sha256


def test_checksum_sees_a_one_bit_change(ctx, tmp_path):
    trainer = Trainer(config(tmp_path), ctx)
    before = parameters_checksum(trainer.model)
    with torch.no_grad():
        p = next(trainer.model.parameters())
        p.view(-1)[0] = torch.nextafter(p.view(-1)[0], torch.tensor(1e9))
    assert parameters_checksum(trainer.model) != before


@pytest.mark.mpi
@pytest.mark.parametrize(
    "sync",
    [
        ["train.grad_sync=ddp", "train.transport=torch"],
        ["train.transport=mpi"],
        ["train.grad_sync=flat", "train.transport=mpi"],
    ],
)
def test_four_rank_resume_is_bitwise_exact(sync, tmp_path):
    """With DDP this needs gradsync.settle(): a fresh DDP reduces its first step in another bucket layout.
    The uninterrupted run b saves at steps 25 and 50 and the resumed run c only at its end, so a save that
    disturbed training would show too. The transport is pinned because b and c are independent
    (transport=auto: see the next test)."""
    from helpers import read_result, run_train

    common = ["train.steps=60", *sync]
    run_train(
        [*common, "checkpoint.every_steps=25", f"train.output_dir={tmp_path / 'b'}", f"hydra.run.dir={tmp_path / 'b'}"],
        ranks=4,
    )
    resumed = tmp_path / "c"
    run_train(
        [
            *common,
            f"checkpoint.resume={tmp_path / 'b' / 'checkpoints' / 'step-25'}",
            f"train.output_dir={resumed}",
            f"hydra.run.dir={resumed}",
        ],
        ranks=4,
    )
    assert read_result(resumed)["resumed_from_step"] == 25
    assert read_result(resumed)["params_sha256"] == read_result(tmp_path / "b")["params_sha256"]


@pytest.mark.mpi
@pytest.mark.parametrize("grad_sync", ["ddp", "flat"])
def test_resume_reuses_the_checkpoints_transport_plan(grad_sync, tmp_path):
    """transport=auto decides once per run; a resumed run must not re-probe (noise could flip a choice and
    change the order of float additions), so the plan travels in the checkpoint."""
    from helpers import read_result, run_train

    first, resumed = tmp_path / "first", tmp_path / "resumed"
    common = ["train.grad_sync=" + grad_sync]
    run_train([*common, "train.steps=20", f"train.output_dir={first}", f"hydra.run.dir={first}"], ranks=2)
    plan = read_result(first)["transport_plan"]
    assert plan and set(plan.values()) <= {"torch", "mpi"}
    done = run_train(
        [
            *common,
            "train.steps=30",
            f"checkpoint.resume={first / 'checkpoints' / 'step-20'}",
            f"train.output_dir={resumed}",
            f"hydra.run.dir={resumed}",
        ],
        ranks=2,
    )
    assert "all-reduce transports from the checkpoint" in done.stderr
    assert "all-reduce transport by buffer size" not in done.stderr  # no second probe
    assert read_result(resumed)["transport_plan"] == plan


def test_time_based_saves_follow_the_clock(ctx, tmp_path, monkeypatch):
    import hpcml.compute.trainer as trainer_module

    now = [1000.0]
    monkeypatch.setattr(trainer_module.time, "monotonic", lambda: now[0])
    trainer = Trainer(config(tmp_path, every_minutes=2.0), ctx)
    assert not trainer.periodic_save_due()
    now[0] += 119
    assert not trainer.periodic_save_due()
    now[0] += 1
    assert trainer.periodic_save_due()
    trainer.save(wait=True)
    assert not trainer.periodic_save_due()  # the clock restarts at each save


@pytest.mark.mpi
def test_resume_at_a_different_world_size_continues_the_same_stream(tmp_path):
    """4 ranks run 60 steps, saving at step 25; 2 ranks resume there and finish. Same samples in the same
    order: the result matches the 4-rank run's to float tolerance (the reduction order differs, so not
    bitwise). (A save does not disturb the run that makes it: test_four_rank_resume_is_bitwise_exact.)"""
    from helpers import read_result, run_train

    run_train(
        [
            "train.steps=60",
            "checkpoint.every_steps=25",
            f"train.output_dir={tmp_path / 'b'}",
            f"hydra.run.dir={tmp_path / 'b'}",
        ],
        ranks=4,
    )
    resumed = tmp_path / "c"
    step25 = tmp_path / "b" / "checkpoints" / "step-25"
    run_train(
        ["train.steps=60", f"checkpoint.resume={step25}", f"train.output_dir={resumed}", f"hydra.run.dir={resumed}"],
        ranks=2,
    )
    assert read_result(resumed)["resumed_from_step"] == 25 and read_result(resumed)["world_size"] == 2
    a = torch.load(tmp_path / "b" / "model.pt", weights_only=True)
    c = torch.load(resumed / "model.pt", weights_only=True)
    for name in a:
        torch.testing.assert_close(c[name], a[name], rtol=1e-4, atol=1e-5)


def user_config(out, steps=30) -> TrainJobConfig:
    """The model, Dataset and task of tests/user_code.py; the task keeps state of its own, and dropout
    draws random numbers every step."""
    return TrainJobConfig(
        model={"_target_": "user_code.TwoHeads", "features": 6, "dropout": 0.2},
        data={"train": {"_target_": "user_code.Waves"}, "eval": {"_target_": "user_code.Waves", "size": 64}},
        task={"_target_": "user_code.Regression"},
        optim={"_target_": "torch.optim.AdamW", "lr": 0.01},
        train=TrainConfig(steps=steps, global_batch_size=32, output_dir=str(out)),
    )


def test_a_users_task_state_and_model_resume_exactly(ctx, tmp_path):
    reference = Trainer(user_config(tmp_path / "ref"), ctx)
    expected = reference.fit().result
    out = tmp_path / "run"
    with PreemptionGuard([signal.SIGUSR2]) as guard:
        trainer = Trainer(user_config(out), ctx, StopCoordinator(guard, Deadline(None, 0), ctx.device, 1, True))
        trainer.after_step.append(signal_at(13))
        assert trainer.fit().stopped is StopReason.SIGNAL
    resumed = Trainer(user_config(out), ctx)
    final = resumed.fit().result
    assert final.resumed_from_step == 13 and final.params_sha256 == expected.params_sha256
    # The task's own state came back from the checkpoint: it counted every sample exactly once.
    assert resumed.task.samples_seen == reference.task.samples_seen == 30 * 32
    assert final.metrics == expected.metrics and set(final.metrics) == {"val_mse"}


def test_an_evaluation_that_fails_loses_no_training(ctx, tmp_path):
    """The final state is saved before the task evaluates: a crash in evaluate() costs a rerun that resumes
    at the last step and only evaluates."""
    failing = user_config(tmp_path)
    failing.task["evaluate_fails"] = True
    with pytest.raises(RuntimeError, match="evaluation crashed"):
        Trainer(failing, ctx).fit()
    assert (tmp_path / "checkpoints" / "step-30").is_dir()
    final = Trainer(user_config(tmp_path), ctx).fit().result
    assert final.resumed_from_step == 30 and set(final.metrics) == {"val_mse"}
