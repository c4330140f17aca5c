"""Data parallelism is only correct if N ranks compute what one process computes on the whole batch."""

import json
import time

import pytest
import torch
from helpers import read_result, run_train

STEPS = ["train.steps=40", "train.global_batch_size=64", "train.log_every=20"]


def train(out_dir, ranks: int, extra: list[str] = ()) -> dict[str, torch.Tensor]:
    run_train([*STEPS, *extra, f"train.output_dir={out_dir}", f"hydra.run.dir={out_dir}"], ranks=ranks)
    result = read_result(out_dir)
    assert result["world_size"] == ranks and result["replicas_identical"]
    return torch.load(out_dir / "model.pt", weights_only=True)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    return train(tmp_path_factory.mktemp("single"), ranks=1)


@pytest.mark.mpi
@pytest.mark.parametrize(
    "sync",
    [
        "grad_sync=ddp transport=torch",
        "grad_sync=ddp transport=mpi",
        "grad_sync=ddp",
        "grad_sync=flat transport=torch",
        "grad_sync=flat transport=mpi",
    ],
)
def test_four_ranks_equal_one_process_on_the_global_batch(sync, one_process, tmp_path):
    four = train(tmp_path, ranks=4, extra=[f"train.{kv}" for kv in sync.split()])
    assert four.keys() == one_process.keys()
    for name, expected in one_process.items():
        torch.testing.assert_close(four[name], expected, rtol=1e-4, atol=1e-5, msg=f"{sync}: {name} differs")


@pytest.mark.mpi
@pytest.mark.parametrize("sync", ["grad_sync=ddp transport=mpi", "grad_sync=flat transport=torch"])
def test_two_ranks_with_two_micro_batches_equal_one_process(sync, one_process, tmp_path):
    """Gradient accumulation across ranks: under DDP the first micro-batch's backward runs in no_sync (with
    hpcml's MPI comm hook registered) and the second's reduces the sum; the flat path sums both into its
    buffer and reduces once. The step is one process's on the whole batch, as 4 ranks x 1 micro-batch is
    (the test above)."""
    two = train(tmp_path, ranks=2, extra=["train.grad_accum_steps=2", *(f"train.{kv}" for kv in sync.split())])
    for name, expected in one_process.items():
        torch.testing.assert_close(two[name], expected, rtol=1e-4, atol=1e-5, msg=f"{name} differs")


@pytest.mark.mpi
def test_three_ranks_average_too(one_process, tmp_path):
    """With a world size that is not a power of two, folding 1/N into the loss is not bitwise the same as
    dividing the sum, but it is the same mean to float precision."""
    three = train(tmp_path, ranks=3, extra=["train.transport=mpi", "train.global_batch_size=63"])
    reference = train(tmp_path / "one", ranks=1, extra=["train.global_batch_size=63"])
    for name, expected in reference.items():
        torch.testing.assert_close(three[name], expected, rtol=1e-4, atol=1e-5, msg=f"{name} differs")


@pytest.mark.mpi
def test_a_wrong_reduction_would_be_caught(one_process, tmp_path):
    """The comparison above has teeth: a different global batch (as a sum instead of a mean would
    produce, or a wrong data slice) lands far outside the tolerance."""
    other = train(tmp_path, ranks=1, extra=["optim.lr=0.1"])
    assert any(not torch.allclose(other[k], one_process[k], rtol=1e-4, atol=1e-5) for k in other)


@pytest.mark.mpi
def test_one_failing_rank_ends_every_rank_with_its_traceback(tmp_path):
    started = time.monotonic()
    done = run_train(
        [
            "train.steps=100000",
            "fault.raise_at_step=5",
            "fault.rank=2",
            f"train.output_dir={tmp_path}",
            f"hydra.run.dir={tmp_path}",
        ],
        ranks=4,
        timeout=120,
        check=False,
    )
    elapsed = time.monotonic() - started
    assert done.returncode != 0
    assert "[rank 2] RuntimeError: injected fault on rank 2 at step 5" in done.stderr
    # 100000 steps would take minutes; the abort ends all four ranks within seconds of the fault.
    assert elapsed < 60, f"ranks lingered {elapsed:.0f}s after one failed"


def run_mpmd(out_dir, rank1_extra: list[str], ranks: int = 4):
    """4 ranks where rank 1 alone gets extra overrides (MPI's MPMD launch): a deliberate mutation made from
    the test, with no hook in hpcml."""
    import subprocess

    from helpers import PYTHON, ROOT, TRAIN, mpi_env

    common = [*STEPS, f"train.output_dir={out_dir}", f"hydra.run.dir={out_dir}", "train.backend=gloo"]
    program = [PYTHON, TRAIN, *common, "train.grad_sync=ddp", "train.transport=torch"]
    cmd = ["mpirun", "--oversubscribe", "--bind-to", "none", "-np", "1", *program]
    cmd += [":", "-np", "1", *program, *rank1_extra, ":", "-np", str(ranks - 2), *program]
    return subprocess.run(cmd, cwd=ROOT, env=mpi_env(), capture_output=True, text=True, timeout=300)


@pytest.mark.mpi
def test_the_comparison_catches_a_rank_training_on_the_wrong_slice(one_process, tmp_path):
    """Teeth for the test above: rank 1 draws its share from a differently shuffled stream (train.seed=1),
    and the 4-rank weights no longer match one process."""
    done = run_mpmd(tmp_path, ["train.seed=1"])
    assert done.returncode == 0, done.stderr[-3000:]
    four = torch.load(tmp_path / "model.pt", weights_only=True)
    assert read_result(tmp_path)["replicas_identical"]  # DDP keeps the replicas equal: only the data is wrong
    assert any(not torch.allclose(four[n], one_process[n], rtol=1e-4, atol=1e-5) for n in one_process)


@pytest.mark.mpi
def test_diverged_replicas_fail_the_run(tmp_path):
    """Rank 1 applies a different learning rate to the same averaged gradients: the replicas drift apart,
    and the run exits non-zero naming it, with every rank's checksum in result.json."""
    done = run_mpmd(tmp_path, ["optim.lr=0.07"])
    assert done.returncode != 0
    assert "replicas diverged: parameter checksums differ across ranks" in done.stderr
    result = read_result(tmp_path)
    assert not result["replicas_identical"] and len(set(result["rank_params_sha256"])) == 2


@pytest.mark.mpi
@pytest.mark.parametrize("launcher", ["torchrun", "mpirun"])
def test_a_rank_that_stops_answering_fails_the_job_after_the_timeout(launcher, tmp_path):
    """A peer blocked in a collective (torch.distributed under torchrun; the MPI stop agreement or gloo under
    mpirun) gives up after train.dist_timeout_s and the whole job ends, instead of hanging for ever. Half-way
    there, the rank that stopped answering has written where it is (every thread's stack)."""
    args = [*STEPS, f"train.output_dir={tmp_path}", f"hydra.run.dir={tmp_path}", "train.backend=gloo"]
    args += ["fault.hang_at_step=5", "fault.rank=1", "train.dist_timeout_s=10"]
    started = time.monotonic()
    done = run_train(args, ranks=2, timeout=240, check=False, launcher=launcher)
    took = time.monotonic() - started
    assert done.returncode != 0
    assert "fault.hang_at_step=5: this rank stops answering" in done.stderr
    assert "Timeout (0:00:05)!" in done.stderr and 'hpcml/compute/drills.py", line' in done.stderr, done.stderr
    assert took < 120, f"the job took {took:.0f} s to end"  # 10 s timeout + start-up + teardown
    assert not (tmp_path / "result.json").exists()


@pytest.mark.mpi
def test_a_users_model_dataset_and_task_train_the_same_on_four_ranks_as_on_one(tmp_path):
    """Model, Dataset (dict samples, built in __getitem__) and task from tests/user_code.py, configs from
    tests/user_conf on Hydra's search path: 4 ranks end where 1 process on the global batch does, and log
    the task's step metric."""
    from user_code import USE

    def run(out, ranks):
        run_train([*USE, *STEPS, "launch.objective=val_mse", f"train.output_dir={out}", f"hydra.run.dir={out}"], ranks)
        return read_result(out), torch.load(out / "model.pt", weights_only=True)

    (one, one_weights), (four, four_weights) = run(tmp_path / "one", 1), run(tmp_path / "four", 4)
    assert four["replicas_identical"] and set(four["metrics"]) == {"val_mse"}
    assert set(four_weights) == {
        "body.0.weight",
        "body.0.bias",
        "heads.0.weight",
        "heads.0.bias",
        "heads.1.weight",
        "heads.1.bias",
    }
    for name, expected in one_weights.items():
        torch.testing.assert_close(four_weights[name], expected, rtol=1e-4, atol=1e-5, msg=f"{name} differs")
    assert four["metrics"]["val_mse"] == pytest.approx(one["metrics"]["val_mse"], rel=1e-4)
    steps = [json.loads(line) for line in (tmp_path / "four" / "metrics.jsonl").read_text().splitlines()]
    assert all("mae" in r for r in steps if "loss" in r)  # the task's step metric, averaged over ranks
