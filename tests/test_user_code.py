"""User code that goes wrong: a NaN loss, a sample that cannot be read, state a task keeps. Each ends
with a clear error naming the rank and step, nothing hangs, and no bad state reaches a checkpoint."""

import json
import time

import numpy as np
import pytest
from helpers import run_train
from user_code import USE

from hpcml.compute.checkpoint import load_latest_verified
from hpcml.compute.data import GlobalBatchStream

# 2048 samples, batches of 64 over 4 ranks (16 each): 32 steps per epoch.
RUN = ["train.steps=40", "train.global_batch_size=64", "train.log_every=10", "data.train.size=2048"]
RANKS = 4


def first_use(sample: int) -> tuple[int, int]:
    """(step, rank) at which the run first trains on `sample`: steps count from 1, as hpcml's logs do."""
    stream = GlobalBatchStream(2048, 64, seed=0)
    for step in range(40):
        where = np.flatnonzero(stream.global_batch(step) == sample)
        if where.size:
            return step + 1, int(where[0]) // (64 // RANKS)
    raise AssertionError(f"sample {sample} is never used")


def a_sample_first_used_in(steps: range) -> tuple[int, int, int]:
    for sample in range(2048):
        step, rank = first_use(sample)
        if step in steps and rank != 0:  # not rank 0: the one that writes checkpoints
            return sample, step, rank
    raise AssertionError("no such sample")


def run(tmp_path, *extra, check=False, launcher="mpirun"):
    return run_train(
        [*USE, *RUN, *extra, f"train.output_dir={tmp_path}", f"hydra.run.dir={tmp_path}"],
        ranks=RANKS,
        check=check,
        timeout=120,
        launcher=launcher,
    )


@pytest.mark.mpi
@pytest.mark.parametrize("launcher", ["mpirun", "torchrun"])
def test_a_nan_loss_on_one_rank_fails_the_job_naming_rank_and_step_and_is_never_saved(launcher, tmp_path):
    """Under mpirun the ranks compare their first bad steps over MPI, under torchrun over torch.distributed."""
    sample, step, rank = a_sample_first_used_in(range(11, 15))
    started = time.monotonic()
    done = run(tmp_path, f"+data.train.poison={sample}", "checkpoint.every_steps=5", launcher=launcher)
    assert f"launcher={'torchrun' if launcher == 'torchrun' else 'Open MPI (mpirun)'} " in done.stderr  # MPI, or none
    assert done.returncode != 0 and time.monotonic() - started < 90
    assert f"NonFiniteLossError: the loss was not finite (NaN or inf) on rank {rank} at step {step}" in done.stderr
    assert "stopped at step 15 without saving" in done.stderr  # the next save found it first
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert kept == ["step-10", "step-5"], kept  # nothing written after the NaN
    latest = load_latest_verified(tmp_path / "checkpoints", 0, __import__("torch").device("cpu"))
    assert all(t.isfinite().all() for t in latest.train_state["model"].values())


@pytest.mark.mpi
def test_a_sample_that_cannot_be_read_fails_the_job_naming_rank_and_step(tmp_path):
    sample, step, rank = a_sample_first_used_in(range(3, 8))
    started = time.monotonic()
    done = run(tmp_path, f"+data.train.unreadable={sample}")
    assert done.returncode != 0 and time.monotonic() - started < 90
    assert f"[rank {rank}] hpcml.errors.DataError: data.train failed on rank {rank} at step {step}" in done.stderr
    assert f"OSError('sample {sample}: input/output error')" in done.stderr


@pytest.mark.mpi
def test_a_resumed_ddp_run_with_dropout_and_task_state_ends_where_the_uninterrupted_one_does(tmp_path):
    """2 ranks under DDP, whose start (and every resume) runs one throwaway step to lay out its buckets: that
    step must leave no trace in the random streams (dropout) or the task's own state, or the resumed run
    drifts from the uninterrupted one."""
    import torch

    common = [*USE, "train.steps=30", "train.global_batch_size=64", "checkpoint.every_steps=10", "+model.dropout=0.2"]
    common += ["train.grad_sync=ddp", "train.transport=torch"]

    def train(out, *extra, check=True):
        return run_train([*common, *extra, f"train.output_dir={out}", f"hydra.run.dir={out}"], ranks=2, check=check)

    train(tmp_path / "whole")
    failed = train(tmp_path / "resumed", "fault.raise_at_step=15", "fault.rank=1", check=False)
    assert failed.returncode != 0 and "injected fault on rank 1 at step 15" in failed.stderr
    train(tmp_path / "resumed")  # the same run again: it resumes from step 10

    def final(out):
        latest = load_latest_verified(out / "checkpoints", 0, torch.device("cpu"))
        return latest.manifest["step"], latest.train_state

    (whole_step, whole), (resumed_step, resumed) = final(tmp_path / "whole"), final(tmp_path / "resumed")
    assert whole_step == resumed_step == 30
    assert json.loads((tmp_path / "resumed" / "result.json").read_text())["resumed_from_step"] == 10
    assert resumed["task"] == whole["task"] == {"samples_seen": 30 * 32}
    for name, tensor in whole["model"].items():
        assert torch.equal(resumed["model"][name], tensor), name


@pytest.mark.mpi
def test_step_metrics_named_differently_on_different_ranks_fail_the_job_instead_of_hanging(tmp_path):
    """Averaging metrics over ranks is a collective per logged step: ranks with different names would
    average different things, or wait on each other. Every rank refuses it at the first logged step."""
    started = time.monotonic()
    done = run(tmp_path, "+task.metric_per_rank=true", "train.steps=20")
    assert done.returncode != 0 and time.monotonic() - started < 90
    assert "returned different metric names on different ranks (rank 0: ['mae', 'mae_rank0'], rank 1:" in done.stderr
