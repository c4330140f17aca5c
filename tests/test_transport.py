"""Choosing the all-reduce transport: the size ladder, the nearest-size lookup, when the probe may stop early,
and when auto means torch."""

import itertools
import random
import statistics

import pytest
import torch

from hpcml.compute import transport
from hpcml.compute.dist import DistributedContext
from hpcml.compute.env import ProcessPlacement
from hpcml.compute.gradsync import NoGradientSync, make_gradient_sync, resolve_transport
from hpcml.compute.transport import (
    AUTO,
    MPI,
    SMALLEST_PROBE_BYTES,
    TORCH,
    TransportPlan,
    TransportSelector,
    probe,
    probe_sizes,
    settled_choice,
)
from hpcml.config import TrainConfig
from hpcml.errors import ConfigError

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


def full_choice(per_round: dict[str, list[float]]) -> str:
    """The choice once every round has run: the lower median, ties to torch."""
    return MPI if statistics.median(per_round[MPI]) < statistics.median(per_round[TORCH]) else TORCH


@pytest.mark.parametrize("rounds", [1, 2, 3, 4, 5])
def test_the_probe_stops_early_only_when_the_rounds_to_come_cannot_change_its_choice(rounds):
    rng = random.Random(rounds)
    stopped_early = 0
    for _ in range(3000):
        # Few distinct values, so ties and near-ties are common, as between noisy transports.
        times = {name: [rng.choice([1.0, 2.0, 3.0, 5.0, 20.0]) for _ in range(rounds)] for name in (TORCH, MPI)}
        final = full_choice(times)
        assert settled_choice(times, rounds) == final
        assert settled_choice({TORCH: [], MPI: []}, rounds) is None
        for done in range(1, rounds):
            early = settled_choice({name: t[:done] for name, t in times.items()}, rounds)
            assert early in (None, final), (times, done)
            stopped_early += early is not None
    # With 2 rounds the second can always move a mean of two: no early stop there.
    assert (stopped_early > 0) == (rounds > 2)


def test_a_clear_winner_settles_in_two_rounds_of_three_and_a_near_tie_takes_all_three():
    assert settled_choice({TORCH: [5.0, 6.0], MPI: [1.0, 1.2]}, 3) == MPI
    assert settled_choice({TORCH: [1.0, 1.1], MPI: [1.2, 1.0]}, 3) is None
    # 4 of 5 done: the last round cannot pull mpi's median below 5.
    assert settled_choice({TORCH: [1.0, 1.0, 1.1, 1.0], MPI: [5.0, 5.0, 5.0, 0.1]}, 5) == TORCH


def test_probe_runs_rounds_until_the_choice_is_settled(monkeypatch):
    """The probe's loop, with the timed all-reduces replaced by scripted maxed times."""
    scripted = {
        64 << 10: {TORCH: iter([9.0, 9.0, 9.0]), MPI: iter([1.0, 1.0, 1.0])},  # settles after 2 rounds
        MB: {TORCH: iter([1.0, 3.0, 2.0]), MPI: iter([2.0, 1.0, 1.5])},  # needs all 3: medians 2.0 vs 1.5
    }
    calls = itertools.count()

    def fake_mean_time(op, iters, warmup=1):
        next(calls)
        return op()

    class World:
        @staticmethod
        def allreduce_sum_(array):
            return next(scripted[array.nbytes][MPI])

    monkeypatch.setattr(transport.mpi, "world", lambda: World)
    monkeypatch.setattr(transport, "iterations_for", lambda op, budget_s: 1)
    monkeypatch.setattr(transport, "mean_time", fake_mean_time)
    monkeypatch.setattr(transport.dist, "all_reduce", lambda t: next(scripted[t.numel() * 4][TORCH]))
    plan, timings = probe([64 << 10, MB], rounds=3)
    assert plan.choices == {64 << 10: MPI, MB: MPI}
    assert [t["rounds"] for t in timings] == [2, 3]
    assert next(calls) == 2 * 2 + 3 * 2


@pytest.mark.parametrize(
    "context",
    [ctx(world_size=1), ctx(uses_mpi=False, launcher="torchrun"), ctx(device="meta")],
    ids=["one rank", "no MPI world", "GPU-like device"],
)
@pytest.mark.parametrize("grad_sync", ["ddp", "flat"])
def test_auto_means_torch_where_mpi_cannot_or_need_not_compete(context, grad_sync):
    assert resolve_transport("auto", context, grad_sync) == TORCH


@pytest.mark.parametrize("grad_sync", ["ddp", "flat"])
def test_auto_probes_on_cpu_ranks_in_an_mpi_world(grad_sync):
    assert resolve_transport("auto", ctx(), grad_sync) == "auto"
    assert resolve_transport("torch", ctx(), grad_sync) == TORCH
    assert resolve_transport("mpi", ctx(), grad_sync) == MPI


def test_mpi_transport_without_mpi_or_per_bucket_on_gpus_is_refused_with_a_fix():
    for grad_sync in ("ddp", "flat"):
        with pytest.raises(ConfigError, match="needs an MPI launcher.*train.transport=auto or torch"):
            resolve_transport("mpi", ctx(uses_mpi=False, launcher="torchrun"), grad_sync)
    with pytest.raises(ConfigError, match="GPUs, where NCCL is the fast path.*train.grad_sync=flat"):
        resolve_transport("mpi", ctx(device="meta"), "ddp")
    # The flat path stages its one buffer through pinned host memory: MPI on GPUs is the user's call.
    assert resolve_transport("mpi", ctx(device="meta"), "flat") == MPI


def test_a_fixed_transport_needs_no_probe_and_leaves_no_plan_in_checkpoints():
    selector = TransportSelector(MPI, world_size=4)
    selector.decide([1 * MB])  # a probe here would need an MPI world of 4: it must not run
    assert selector.for_bytes(8 * MB) == MPI
    assert selector.state_dict() == {"transport_plan": None, "world_size": 4}
    selector.load_state_dict({"transport_plan": {str(MB): TORCH}, "world_size": 4})
    assert selector.for_bytes(MB) == MPI  # the configured transport wins over a checkpoint's plan


def test_an_auto_plan_travels_in_checkpoints_at_the_same_world_size():
    before = TransportSelector(AUTO, world_size=4)
    assert before.for_bytes(MB) == TORCH  # DDP's throwaway backward, before the probe
    before.plan = TransportPlan({64 << 10: MPI, 16 * MB: TORCH})
    state = before.state_dict()
    assert state == {"transport_plan": {str(64 << 10): MPI, str(16 * MB): TORCH}, "world_size": 4}

    resumed = TransportSelector(AUTO, world_size=4)
    resumed.load_state_dict(state)
    assert resumed.for_bytes(64 << 10) == MPI
    resumed.decide([MB])  # the plan is there: no probe
    assert resumed.plan == before.plan

    rescaled = TransportSelector(AUTO, world_size=8)
    rescaled.load_state_dict(state)  # another world size: timings (and summation order) differ anyway
    assert rescaled.plan is None


def test_one_rank_alone_gets_no_ddp_and_no_probe():
    model = torch.nn.Linear(3, 2)
    sync = make_gradient_sync(model, ctx(world_size=1), TrainConfig())
    assert isinstance(sync, NoGradientSync) and sync.module is model
    sync.settle(lambda module: module(torch.ones(1, 3)).sum())  # nothing to probe or lay out
    sync.backward(model(torch.ones(1, 3)).sum())
    assert torch.equal(model.bias.grad, torch.ones(2)) and sync.state_dict() == {}


@pytest.fixture
def process_group(monkeypatch):
    """A one-rank gloo process group in this process, torn down afterwards."""
    from hpcml.compute.dist import setup_distributed, teardown_distributed
    from hpcml.compute.env import SingleProcessEnvironment

    monkeypatch.delenv("MASTER_ADDR", raising=False)
    yield setup_distributed(SingleProcessEnvironment({}), "gloo", 30)
    teardown_distributed()


def test_the_flat_path_needs_no_mpi_launcher(process_group):
    """With transport=auto and no MPI world the flat buffer goes over the process group; nothing to probe."""
    from hpcml.compute.gradsync import FlatGradientSync

    model = torch.nn.Linear(3, 2)
    sync = make_gradient_sync(model, process_group, TrainConfig(grad_sync="flat"))
    assert isinstance(sync, FlatGradientSync) and sync.selector.requested == TORCH
    sync.settle(lambda module: module(torch.ones(1, 3)).sum())
    sync.zero_grad(None)
    sync.backward(model(torch.ones(1, 3)).sum())
    sync.synchronize()
    assert torch.equal(model.bias.grad, torch.ones(2))
    assert model.bias.grad.data_ptr() == sync.flat_grad[model.weight.numel() :].data_ptr()  # still a view
    assert sync.state_dict() == {"transport_plan": None, "world_size": 1}


def test_the_mpi_comm_hook_reuses_its_bucket_views_until_the_buckets_move(process_group):
    import weakref

    from hpcml.compute.gradsync import DDPGradientSync

    mpi_ctx = DistributedContext(process_group.placement, "gloo", process_group.device, "mpirun", uses_mpi=True)
    sync = DDPGradientSync(torch.nn.Linear(4, 2), mpi_ctx, TrainConfig(transport="mpi"))
    bucket = torch.ones(10)
    first = sync.reduce_bucket(0, bucket)
    assert sync.reduce_bucket(0, bucket) is first and first.value() is bucket  # completed, step after step
    moved = torch.ones(10)
    assert sync.reduce_bucket(0, moved).value() is moved  # DDP laid its buckets out anew
    # Index 1: the throwaway backward's one bucket (index 0) does not replace it, only dropping every view does.
    unused = torch.ones(10)
    sync.reduce_bucket(1, unused)
    held = [weakref.ref(moved), weakref.ref(unused)]
    sync.settle(lambda module: module(torch.ones(1, 4)).sum())
    del moved, unused
    assert [ref() for ref in held] == [None, None]  # no bucket from before the layout pass is kept alive


def test_the_comm_hook_does_not_keep_ddp_and_its_process_group_alive(process_group):
    """DDP keeps its hook in C++, out of the cycle collector's sight: a hook bound to the sync object kept
    DDP (and the process group) alive until interpreter exit, where gloo's threads aborted the process."""
    import gc
    import weakref

    from hpcml.compute.gradsync import DDPGradientSync

    mpi_ctx = DistributedContext(process_group.placement, "gloo", process_group.device, "mpirun", uses_mpi=True)
    sync = DDPGradientSync(torch.nn.Linear(4, 2), mpi_ctx, TrainConfig(transport="mpi"))
    assert sync.selector.requested == MPI  # the hook is registered
    ddp = weakref.ref(sync.module)
    del sync
    gc.collect()
    assert ddp() is None
