"""The GPU benchmark's CPU-independent parts, run on CPU: hpcml's side is the loop's whole step (the step
boundary included), the hand-written loop does the same work, and every round's pair is kept. The
benchmark itself is skipped without CUDA."""

from dataclasses import replace

import pytest
import torch

from hpcml.bench import gpu, training
from hpcml.bench.launch import BenchmarkSkipped
from hpcml.compute.trainer import Trainer

TINY = replace(training.COMPUTE_BOUND, width=16, depth=2, input_dim=8, per_rank_batch=4)


def test_the_hand_written_loop_does_the_same_work_as_the_trainer(process_group, tmp_path):
    trainer = training.make_trainer(TINY, process_group, tmp_path)
    loop = gpu.HandWrittenLoop(trainer)
    for _ in range(3):
        trainer.train_step()
        loop.step()
    for mine, theirs in zip(trainer.model.parameters(), loop.model.parameters(), strict=True):
        assert torch.equal(mine, theirs)  # same model, optimizer, batches: the same weights, bitwise


def test_hpcmls_side_is_the_whole_loop_step_and_every_round_is_kept(process_group, tmp_path, monkeypatch):
    boundaries = []
    decide = Trainer.boundary_decision
    monkeypatch.setattr(Trainer, "boundary_decision", lambda self: boundaries.append(self.step) or decide(self))
    row = gpu.measure(TINY, process_group, budget_s=0.001, rounds=3, workdir=tmp_path)
    assert boundaries, "the step boundary (stop agreement) must be inside hpcml's timed step"
    assert len(row["rounds_s"]["hpcml"]) == len(row["rounds_s"]["hand_written"]) == 3
    (figure,) = gpu.figures_for([row])
    assert figure.target == gpu.TARGET and figure.rounds == 3 and "loop step" in figure.name
    assert figure.value == pytest.approx(TINY.per_rank_batch / row["hpcml_step_s"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_cuda_the_benchmark_is_skipped_not_failed(tmp_path):
    with pytest.raises(BenchmarkSkipped, match="no CUDA device"):
        gpu.run(quick=True, workdir=tmp_path)
