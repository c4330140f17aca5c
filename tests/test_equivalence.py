"""Data parallelism is only correct if N ranks compute what one process computes on the whole batch."""

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
