"""The all-reduce benchmark's DDP path goes through DDP's reducer and hpcml's comm hook, one bucket of the
size under test, and its figures pair each round's hpcml and raw times."""

import pytest

from hpcml.bench import allreduce
from hpcml.compute.dist import DistributedContext
from hpcml.compute.gradsync import DDPGradientSync
from hpcml.config import TrainConfig


def test_the_ddp_path_is_a_backward_whose_one_bucket_goes_through_hpcmls_comm_hook(process_group, monkeypatch):
    reduced = []
    original = DDPGradientSync.reduce_bucket

    def counting(self, index, buffer):
        reduced.append(buffer.numel())
        return original(self, index, buffer)

    monkeypatch.setattr(DDPGradientSync, "reduce_bucket", counting)
    # As under an MPI launcher, where training registers the hook (with one rank, auto would mean DDP's own path).
    mpi_ctx = DistributedContext(process_group.placement, "gloo", process_group.device, "mpirun", uses_mpi=True)
    numel = 300_000  # bigger than DDP's 1 MB first bucket: still one bucket, since it is one parameter
    ddp = allreduce.DDPBackward(numel, mpi_ctx, TrainConfig(transport="mpi", ddp_bucket_cap_mb=25.0))
    assert ddp.uses_comm_hook
    reduced.clear()  # the layout pass
    ddp.synced()
    assert reduced == [numel]
    ddp.local()
    assert reduced == [numel]  # no_sync(): the same forward and backward, no all-reduce
    ddp.synced()
    assert reduced == [numel, numel]


def test_each_size_keeps_every_rounds_time_for_every_path(process_group):
    measured = allreduce._measure_size(64 << 10, budget_s=0.001, rounds=2, ctx=process_group)
    assert set(measured["rounds_s"]) >= {*allreduce.PATHS, "ddp_backward", "ddp_backward_no_sync"}
    assert all(len(times) == 2 and min(times) > 0 for times in measured["rounds_s"].values())
    assert not measured["ddp_comm_hook"] and measured["ddp_transport"] == "torch"  # one rank: DDP's own path


def test_figures_pair_each_round_against_the_better_raw_path_by_median():
    def path(busbws):
        return {"busbw_GBps": sorted(busbws)[1], "rounds_busbw_GBps": busbws}

    row = {
        "bytes": 4 << 20,
        "raw_gloo": path([1.0, 1.0, 9.0]),  # one lucky round does not make gloo the baseline
        "raw_mpi": path([2.0, 2.0, 2.0]),
        "hpcml_ddp": path([1.0, 1.9, 2.0]),
        "hpcml_flat": path([2.0, 2.0, 2.0]),
    }
    small = {**row, "bytes": 64 << 10}
    figures = allreduce.figures_for("2 ranks", [small, row])
    assert [f.name for f in figures] == ["hpcml_ddp busbw, 4 MB, 2 ranks", "hpcml_flat busbw, 4 MB, 2 ranks"]
    ddp = figures[0]
    assert ddp.baseline_name == "raw_mpi" and ddp.rounds == 3
    assert ddp.round_ratios == pytest.approx([0.5, 0.95, 1.0]) and ddp.met  # the median round: 0.95
