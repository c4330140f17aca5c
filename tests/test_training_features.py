"""What real runs need, in one process: gradient accumulation, clipping by global norm, mixed precision with
a checkpointed loss scale, evaluation every N steps, torch.compile; resumed runs with accumulation, fp16
and DataLoader workers end bitwise equal to uninterrupted ones."""

import copy
import functools
import json
import signal
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from hpcml.compute.checkpoint import STATE_FILE
from hpcml.compute.preempt import Deadline, PreemptionGuard, StopCoordinator, StopReason
from hpcml.compute.trainer import Trainer
from hpcml.config import FaultConfig, LoaderConfig, TrainConfig, TrainJobConfig
from hpcml.errors import ConfigError


@pytest.fixture
def ctx(process_group):
    return process_group


# SGD, not Adam: Adam's update barely changes when every gradient is scaled alike, so a lost 1/N of the
# micro-batch average or a skipped clip would hide behind it.
SGD = {"_target_": "torch.optim.SGD", "lr": 0.05, "momentum": 0.9}


def config(out, steps=30, **train) -> TrainJobConfig:
    return TrainJobConfig(optim=SGD, train=TrainConfig(steps=steps, global_batch_size=32, output_dir=str(out), **train))


def user_config(out, steps=30, workers=0, **train) -> TrainJobConfig:
    """tests/user_code.py's model with dropout, its augmenting Dataset, and a task with state of its own."""
    return TrainJobConfig(
        loader=LoaderConfig(num_workers=workers),
        model={"_target_": "user_code.TwoHeads", "features": 6, "dropout": 0.2},
        data={
            "train": {"_target_": "user_code.Waves", "noise": 0.3},
            "eval": {"_target_": "user_code.Waves", "size": 64, "noise": 0.3},
        },
        task={"_target_": "user_code.Regression"},
        optim={"_target_": "torch.optim.AdamW", "lr": 0.01},
        train=TrainConfig(steps=steps, global_batch_size=32, output_dir=str(out), **train),
    )


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def interrupted_then_resumed(ctx, make_config, out, at_step):
    """A run stopped by a real SIGUSR2 right after `at_step`, then a fresh trainer that resumes it."""
    with PreemptionGuard([signal.SIGUSR2]) as guard:
        trainer = Trainer(make_config(out), ctx, StopCoordinator(guard, Deadline(None, 0), ctx.device, 1, True))
        trainer.after_step.append(lambda t: t.step == at_step and signal.raise_signal(signal.SIGUSR2))
        assert trainer.fit().stopped is StopReason.SIGNAL
    return Trainer(make_config(out), ctx).fit().result


def test_micro_batches_train_as_the_whole_batch_does(ctx, tmp_path):
    """4 micro-batches of 8 == one batch of 32: the same samples, the same mean gradient (to float rounding:
    the sum runs in another order)."""
    whole = Trainer(config(tmp_path / "whole"), ctx)
    whole.fit()
    micro = Trainer(config(tmp_path / "micro", grad_accum_steps=4), ctx)
    assert len(micro.batches.next_batch(0)) == 4
    result = micro.fit().result
    for name, expected in weights(whole).items():
        torch.testing.assert_close(weights(micro)[name], expected, rtol=1e-4, atol=1e-5, msg=name)
    assert result.steps == 30
    logged = [json.loads(line) for line in (tmp_path / "micro" / "metrics.jsonl").read_text().splitlines()]
    whole_logged = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    # The logged loss is the step's mean over its micro-batches: the whole batch's loss.
    assert logged[0]["loss"] == pytest.approx(whole_logged[0]["loss"], rel=1e-5)


def test_a_run_with_micro_batches_and_a_users_task_resumes_exactly(ctx, tmp_path):
    expected = Trainer(user_config(tmp_path / "ref", grad_accum_steps=2), ctx).fit().result
    resumed = interrupted_then_resumed(ctx, lambda out: user_config(out, grad_accum_steps=2), tmp_path / "run", 13)
    assert resumed.resumed_from_step == 13 and resumed.params_sha256 == expected.params_sha256


def test_micro_batches_that_do_not_divide_the_batch_are_refused():
    with pytest.raises(ConfigError, match="train.global_batch_size=32 does not split into train.grad_accum_steps=3"):
        TrainConfig(global_batch_size=32, grad_accum_steps=3)


def test_clipping_under_the_limit_changes_nothing(ctx, tmp_path):
    plain = Trainer(config(tmp_path / "plain"), ctx).fit().result
    loose = Trainer(config(tmp_path / "loose", clip_grad_norm=1e6), ctx).fit().result
    assert loose.params_sha256 == plain.params_sha256  # bitwise: every gradient multiplied by exactly 1
    logged = [json.loads(line) for line in (tmp_path / "loose" / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < r["grad_norm"] < 1e6 for r in logged if "loss" in r)


def test_clipping_over_the_limit_is_torchs_clip_grad_norm_in_a_hand_written_step(ctx, tmp_path):
    """One step of the trainer against the same step by hand: forward, backward, clip_grad_norm_, step."""
    limit = 0.05
    trainer = Trainer(config(tmp_path / "clip", clip_grad_norm=limit), ctx)
    model = copy.deepcopy(trainer.model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    (x, y) = trainer.batches.peek(0)
    trainer.settle()
    trainer.train_step()

    F.cross_entropy(model(x), y).backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), limit)
    optimizer.step()
    assert norm > limit  # the case this test is about: the limit bites
    assert float(trainer.grad_norm) == pytest.approx(float(norm), rel=1e-6)  # the norm logged: before clipping
    for name, value in model.state_dict().items():
        torch.testing.assert_close(trainer.model.state_dict()[name], value, rtol=1e-6, atol=1e-7, msg=name)


def test_bf16_autocast_trains(ctx, tmp_path):
    result = Trainer(config(tmp_path / "bf16", steps=60, precision="bf16"), ctx).fit().result
    assert result.metrics["test_accuracy"] > 0.8


def test_fp16_keeps_its_loss_scale_in_the_checkpoint_and_resumes_exactly(ctx, tmp_path):
    make = lambda out: user_config(out, precision="fp16")  # noqa: E731
    expected = Trainer(make(tmp_path / "ref"), ctx).fit().result
    resumed = interrupted_then_resumed(ctx, make, tmp_path / "run", 13)
    assert resumed.resumed_from_step == 13 and resumed.params_sha256 == expected.params_sha256
    # The scale the run had adapted to, not a fresh scaler's: the test above alone would not see a lost one
    # (scales are powers of two, so unscaled gradients come out the same either way until one overflows).
    saved = torch.load(tmp_path / "run" / "checkpoints" / "step-13" / STATE_FILE, weights_only=False)["grad_scaler"]
    restored = Trainer(make(tmp_path / "run2"), ctx)
    restored.cfg.checkpoint.resume = str(tmp_path / "run" / "checkpoints" / "step-13")
    restored.resume()
    fresh = torch.amp.GradScaler("cpu").state_dict()
    assert saved["scale"] != fresh["scale"] and restored.precision.state_dict() == saved


def test_a_resume_with_loader_workers_and_dropout_is_exact(ctx, tmp_path):
    """Starting a DataLoader iterator draws its workers' base seed: from the rank's own random stream it would
    shift dropout's draws at a resume's first step, and not at step 0."""
    make = lambda out: user_config(out, workers=1)  # noqa: E731
    expected = Trainer(make(tmp_path / "ref"), ctx).fit().result
    resumed = interrupted_then_resumed(ctx, make, tmp_path / "run", 13)
    assert resumed.resumed_from_step == 13 and resumed.params_sha256 == expected.params_sha256


def test_a_resume_onto_another_sample_stream_is_refused(ctx, tmp_path):
    interrupted_then_resumed(ctx, lambda out: config(out), tmp_path / "run", 13)
    other = config(tmp_path / "run")
    other.train.seed = 1
    with pytest.raises(ConfigError, match="would continue another stream"):
        Trainer(other, ctx).resume()


def test_evaluating_every_n_steps_changes_no_training_and_logs_each_evaluation(ctx, tmp_path):
    """The Dataset augments with random draws in __getitem__ and the model has dropout: an evaluation that
    moved a random stream would change the training after it."""
    plain = Trainer(user_config(tmp_path / "plain"), ctx).fit().result
    evaluated = Trainer(user_config(tmp_path / "eval", eval_every_steps=10), ctx).fit().result
    assert evaluated.params_sha256 == plain.params_sha256
    logged = [json.loads(line) for line in (tmp_path / "eval" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "val_mse" in r] == [10, 20, 30]


def test_an_evaluation_leaves_frozen_parts_frozen(ctx, tmp_path):
    """A user who keeps a part of the model in eval mode (here its dropout): a mid-run evaluation gives every
    module its own mode back, not train() for all."""

    def run(out, every):
        trainer = Trainer(user_config(out, eval_every_steps=every), ctx)
        trainer.model.body[2].eval()  # the Dropout, frozen
        return trainer.fit().result.params_sha256

    assert run(tmp_path / "eval", 10) == run(tmp_path / "plain", 0)


def test_evaluating_without_eval_data_or_pausing_without_micro_batches_is_refused():
    with pytest.raises(ConfigError, match="train.eval_every_steps=10 needs an eval dataset"):
        TrainJobConfig(data={"eval": None}, train=TrainConfig(eval_every_steps=10))
    with pytest.raises(ConfigError, match="needs train.grad_accum_steps of 2 or more"):
        TrainJobConfig(fault=FaultConfig(pause_between_micro_batches_at_step=3))


def test_torch_compile_trains_the_same_model(ctx, tmp_path, monkeypatch):
    """train.compile runs the forward through torch.compile's graph capture (TorchDynamo and AOT autograd);
    the test skips only the C++ code generation (inductor), which costs half a minute on CPU and is torch's."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    eager = Trainer(config(tmp_path / "eager", steps=5), ctx)
    eager.fit()
    compiled = Trainer(config(tmp_path / "compiled", steps=5, compile=True), ctx)
    assert compiled.forward_module is not compiled.sync.module
    compiled.fit()
    for name, expected in weights(eager).items():
        torch.testing.assert_close(weights(compiled)[name], expected, rtol=1e-4, atol=1e-5, msg=name)


def test_the_train_config_refuses_an_unknown_precision():
    with pytest.raises(ConfigError, match="train.precision"):
        replace(TrainConfig(), precision="fp8").__post_init__()


def test_the_train_config_refuses_a_collective_timeout_under_a_second():
    with pytest.raises(ConfigError, match=r"^train.dist_timeout_s=0 must be 1 or more"):
        TrainConfig(dist_timeout_s=0)
