"""The GPU path on a real GPU: NCCL chosen and used, data and model on the device, exact resume (sync and
async saves of GPU state), the flat gradient path over NCCL and over MPI through pinned host memory, and
a clear refusal when ranks would share a GPU. Skipped where no CUDA device is visible (CI has none); docs/PERFORMANCE.md
records the GPU they last ran on.
"""

import subprocess

import pytest
import torch
import torch.distributed as dist
from helpers import PYTHON, ROOT, TRAIN, mpi_env, read_result, run_train
from test_resume import config, run_interrupted

from hpcml.compute.dist import setup_distributed, teardown_distributed
from hpcml.compute.env import SingleProcessEnvironment
from hpcml.compute.trainer import Trainer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture
def gpu_ctx(monkeypatch):
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    context = setup_distributed(SingleProcessEnvironment({}), "auto", 60)
    yield context
    teardown_distributed()


def test_auto_backend_trains_on_the_gpu_with_nccl(gpu_ctx, tmp_path):
    assert gpu_ctx.backend == "nccl" and dist.get_backend() == "nccl"
    assert gpu_ctx.device == torch.device("cuda", 0)
    trainer = Trainer(config(tmp_path, steps=200), gpu_ctx)
    assert trainer.train_data.tensors[0].is_cuda  # the digits fit: batches are gathered on the device
    assert all(p.is_cuda for p in trainer.model.parameters())
    result = trainer.fit().result
    assert result.backend == "nccl"
    assert result.metrics["test_accuracy"] > 0.9


def test_the_flat_path_reduces_its_gpu_buffer_with_nccl(gpu_ctx, tmp_path):
    """train.grad_sync=flat with transport=auto: one NCCL all-reduce of the GPU buffer, no host staging."""
    from hpcml.compute.gradsync import FlatGradientSync

    cfg = config(tmp_path, steps=200)
    cfg.train.grad_sync = "flat"
    trainer = Trainer(cfg, gpu_ctx)
    assert isinstance(trainer.sync, FlatGradientSync) and trainer.sync.selector.requested == "torch"
    assert trainer.sync.flat_grad.is_cuda and trainer.sync.host is trainer.sync.flat_grad
    assert trainer.fit().result.metrics["test_accuracy"] > 0.9


def test_interrupted_gpu_runs_resume_bitwise(gpu_ctx, tmp_path):
    reference = Trainer(config(tmp_path / "ref"), gpu_ctx).fit().result.params_sha256
    out = tmp_path / "run"
    for at in (9, 31):
        assert run_interrupted(gpu_ctx, out, at).step == at
    final = Trainer(config(out), gpu_ctx).fit().result
    assert final.resumed_from_step == 31
    assert final.params_sha256 == reference


def test_async_saves_of_gpu_state_resume_bitwise(gpu_ctx, tmp_path):
    # The writer thread copies GPU tensors into pinned host buffers while the next step runs.
    reference = Trainer(config(tmp_path / "ref"), gpu_ctx).fit().result.params_sha256
    out = tmp_path / "run"
    assert run_interrupted(gpu_ctx, out, 27, every_steps=4, async_save=True, keep_last=2).step == 27
    assert Trainer(config(out), gpu_ctx).fit().result.params_sha256 == reference


@pytest.mark.mpi
def test_mpi_gradient_path_on_the_gpu(tmp_path):
    """The flat path over MPI stages GPU gradients through pinned host memory (mpirun -np 1 on one GPU)."""
    args = ["train.steps=100", "train.grad_sync=flat", "train.transport=mpi", "train.backend=auto",
            f"train.output_dir={tmp_path}", f"hydra.run.dir={tmp_path}"]  # fmt: skip
    cmd = ["mpirun", "-np", "1", PYTHON, TRAIN, *args]
    done = subprocess.run(cmd, cwd=ROOT, env=mpi_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = read_result(tmp_path)
    assert (result["backend"], result["grad_sync"]) == ("nccl", "flat")
    assert result["metrics"]["test_accuracy"] > 0.85


@pytest.mark.mpi
@pytest.mark.skipif(torch.cuda.device_count() != 1, reason="needs exactly one visible GPU")
def test_two_ranks_on_one_gpu_are_refused_with_the_fix(tmp_path):
    done = run_train(["train.steps=5", "train.backend=auto", f"train.output_dir={tmp_path}",
                      f"hydra.run.dir={tmp_path}"], ranks=2, check=False)  # fmt: skip
    assert done.returncode != 0
    assert "ranks 0, 1 on node" in done.stderr and "NCCL needs a GPU of its own for every rank" in done.stderr
    assert "train.backend=gloo" in done.stderr
    assert "Duplicate GPU" not in done.stderr  # refused before NCCL sees it
    assert not (tmp_path / "result.json").exists()
