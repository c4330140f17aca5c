"""Choosing the all-reduce transport: the size ladder, the nearest-size lookup, and when auto means torch."""

import pytest
import torch

from hpcml.config import TrainConfig
from hpcml.dist import DistributedContext
from hpcml.env import ProcessPlacement
from hpcml.errors import ConfigError
from hpcml.gradsync import NoGradientSync, make_gradient_sync, resolve_ddp_transport
from hpcml.transport import MPI, SMALLEST_PROBE_BYTES, TORCH, TransportPlan, probe_sizes

MB = 1 << 20


def ctx(world_size=4, uses_mpi=True, device="cpu", launcher="Open MPI (mpirun)"):
    placement = ProcessPlacement(0, world_size, 0, world_size, 0, 1)
    return DistributedContext(placement, "gloo", torch.device(device), launcher, uses_mpi)


def test_probe_ladder_grows_by_four_and_ends_at_the_largest_bucket():
    assert probe_sizes(25 * MB) == [64 << 10, 256 << 10, 1 * MB, 4 * MB, 16 * MB, 25 * MB]
    assert probe_sizes(4 * MB) == [64 << 10, 256 << 10, 1 * MB, 4 * MB]
    assert probe_sizes(10_000) == [SMALLEST_PROBE_BYTES]


def test_a_bucket_takes_the_choice_of_the_nearest_probed_size():
    plan = TransportPlan({64 << 10: MPI, 1 * MB: MPI, 16 * MB: TORCH})
    assert plan.for_bytes(4 << 10) == MPI
    assert plan.for_bytes(2 * MB) == MPI  # nearer 1 MB than 16 MB on a log scale
    assert plan.for_bytes(8 * MB) == TORCH
    assert plan.for_bytes(1 << 30) == TORCH
    assert TransportPlan.from_state(plan.as_state()) == plan


@pytest.mark.parametrize(
    "context",
    [ctx(world_size=1), ctx(uses_mpi=False, launcher="torchrun"), ctx(device="meta")],
    ids=["one rank", "no MPI world", "GPU-like device"],
)
def test_auto_means_torch_where_mpi_cannot_or_need_not_compete(context):
    assert resolve_ddp_transport("auto", context) == TORCH


def test_auto_probes_on_cpu_ranks_in_an_mpi_world():
    assert resolve_ddp_transport("auto", ctx()) == "auto"
    assert resolve_ddp_transport("torch", ctx()) == TORCH
    assert resolve_ddp_transport("mpi", ctx()) == MPI


def test_mpi_transport_without_mpi_or_on_gpus_is_refused_with_a_fix():
    with pytest.raises(ConfigError, match="needs an MPI launcher.*ddp_transport=auto or torch"):
        resolve_ddp_transport("mpi", ctx(uses_mpi=False, launcher="torchrun"))
    with pytest.raises(ConfigError, match="GPUs, where NCCL is the fast path"):
        resolve_ddp_transport("mpi", ctx(device="meta"))


def test_one_rank_alone_gets_no_ddp_and_no_probe():
    model = torch.nn.Linear(3, 2)
    sync = make_gradient_sync(model, ctx(world_size=1), TrainConfig())
    assert isinstance(sync, NoGradientSync) and sync.module is model
    sync.settle(lambda module: module(torch.ones(1, 3)).sum())  # nothing to probe or lay out
    sync.backward(model(torch.ones(1, 3)).sum())
    assert torch.equal(model.bias.grad, torch.ones(2)) and sync.state_dict() == {}


def test_the_comm_hook_does_not_keep_ddp_and_its_process_group_alive(monkeypatch):
    """DDP keeps its hook in C++, out of the cycle collector's sight: a hook bound to the sync object kept
    DDP (and the process group) alive until interpreter exit, where gloo's threads aborted the process."""
    import gc
    import weakref

    from hpcml.dist import setup_distributed, teardown_distributed
    from hpcml.env import SingleProcessEnvironment
    from hpcml.gradsync import DDPGradientSync

    monkeypatch.delenv("MASTER_ADDR", raising=False)
    base = setup_distributed(SingleProcessEnvironment({}), "gloo", 30)
    try:
        mpi_ctx = DistributedContext(base.placement, "gloo", base.device, "Open MPI (mpirun)", uses_mpi=True)
        sync = DDPGradientSync(torch.nn.Linear(4, 2), mpi_ctx, TrainConfig(ddp_transport="mpi"))
        assert sync.transport == MPI  # the hook is registered
        ddp = weakref.ref(sync.module)
        del sync
        gc.collect()
        assert ddp() is None
    finally:
        teardown_distributed()
