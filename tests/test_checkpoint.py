import json
import threading
import time

import pytest
import torch

from hpcml.compute import checkpoint as ckpt
from hpcml.compute.checkpoint import replicated
from hpcml.fileio import CHECKSUMS, digest_of

CPU = torch.device("cpu")


def snap(step: int, value: float = 1.0, ranks: int = 2) -> ckpt.Snapshot:
    state = {"model": {"w": torch.full((4, 4), value)}, "optimizer": {"state": {}, "param_groups": []}}
    rngs = [ckpt.capture_rng_state() for _ in range(ranks)]
    return ckpt.snapshot(step, step * 8, 8, ranks, state, rngs, copy=True)


def test_write_verify_load_round_trip(tmp_path):
    path = ckpt.write_checkpoint(tmp_path, snap(10, 3.0))
    assert path.name == "step-10"
    manifest = ckpt.verify_checkpoint(path)
    assert manifest["step"] == 10 and manifest["samples_consumed"] == 80 and manifest["world_size"] == 2
    assert set(manifest["files"]) == {"train_state.pt", "rng-rank0.pt", "rng-rank1.pt"}
    loaded = ckpt.load_checkpoint(path, manifest, rank=1, device=torch.device("cpu"))
    assert torch.equal(loaded.train_state["model"]["w"], torch.full((4, 4), 3.0))
    assert loaded.rng_state is not None and loaded.step == 10
    # A rank beyond the writers' world keeps its own generators.
    assert ckpt.load_checkpoint(path, manifest, rank=5, device=torch.device("cpu")).rng_state is None


def test_rng_state_round_trips_exactly():
    import random

    import numpy as np

    state = ckpt.capture_rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    ckpt.restore_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_newest_verified_wins_and_corruption_falls_back(tmp_path, caplog):
    for step in (10, 20, 30):
        ckpt.write_checkpoint(tmp_path, snap(step))
    assert ckpt.load_latest_verified(tmp_path, 0, CPU).path.name == "step-30"
    # Bit flip in the newest, truncation in the next: both skipped, with the reason logged.
    state = tmp_path / "step-30" / "train_state.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0x01
    state.write_bytes(bytes(data))
    rng = tmp_path / "step-20" / "rng-rank1.pt"
    rng.write_bytes(rng.read_bytes()[:-7])
    with caplog.at_level("WARNING"):
        loaded = ckpt.load_latest_verified(tmp_path, 0, CPU)
    assert loaded.path.name == "step-10" and loaded.manifest["step"] == 10 and loaded.step == 10
    assert "step-30: train_state.pt fails its xxh3_128 checksum" in caplog.text
    assert "step-20: rng-rank1.pt has" in caplog.text and "(truncated?)" in caplog.text


def test_folder_without_manifest_or_with_a_bad_one_is_never_trusted(tmp_path):
    ckpt.write_checkpoint(tmp_path, snap(5))
    (tmp_path / "step-9").mkdir()
    (tmp_path / "step-9" / "train_state.pt").write_bytes(b"x")
    (tmp_path / "step-8").mkdir()
    (tmp_path / "step-8" / "manifest.json").write_text("{not json")
    assert ckpt.load_latest_verified(tmp_path, 0, CPU).path.name == "step-5"
    with pytest.raises(ckpt.CheckpointCorruptError, match="no manifest.json"):
        ckpt.verify_checkpoint(tmp_path / "step-9")
    with pytest.raises(ckpt.CheckpointCorruptError, match="unreadable manifest.json"):
        ckpt.verify_checkpoint(tmp_path / "step-8")


def test_missing_file_and_unknown_format(tmp_path):
    path = ckpt.write_checkpoint(tmp_path, snap(5))
    (path / "rng-rank0.pt").unlink()
    with pytest.raises(ckpt.CheckpointCorruptError, match="rng-rank0.pt is missing"):
        ckpt.verify_checkpoint(path)
    path = ckpt.write_checkpoint(tmp_path, snap(6))
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["format"] = 99
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ckpt.CheckpointCorruptError, match="format 99"):
        ckpt.verify_checkpoint(path)


def test_partial_folders_are_ignored_and_pruned_with_old_checkpoints(tmp_path):
    for step in (1, 2, 3, 4):
        ckpt.write_checkpoint(tmp_path, snap(step))
    (tmp_path / ".step-5.partial").mkdir()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-4", "step-3", "step-2", "step-1"]
    ckpt.prune_checkpoints(tmp_path, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-3", "step-4"]


def test_async_writer_snapshots_and_never_runs_two_writes_at_once(tmp_path, monkeypatch):
    live = {"model": {"w": torch.zeros(3)}}
    concurrent, peak, lock = [0], [0], threading.Lock()
    real_write = ckpt.write_checkpoint

    def tracked(directory, s):
        with lock:
            concurrent[0] += 1
            peak[0] = max(peak[0], concurrent[0])
        try:
            return real_write(directory, s)
        finally:
            with lock:
                concurrent[0] -= 1

    monkeypatch.setattr(replicated, "write_checkpoint", tracked)
    writer = ckpt.CheckpointWriter(tmp_path, keep_last=10, asynchronous=True)
    for step in range(1, 6):
        writer.submit(ckpt.snapshot(step, step, 1, 1, live, [ckpt.capture_rng_state()], copy=True))
        live["model"]["w"] += 1  # training goes on while the write runs: the snapshot must not change
    writer.wait()
    assert peak[0] == 1
    for step in range(1, 6):
        path = tmp_path / f"step-{step}"
        state = ckpt.load_checkpoint(path, ckpt.verify_checkpoint(path), 0, torch.device("cpu")).train_state
        assert torch.equal(state["model"]["w"], torch.full((3,), float(step - 1)))


def test_a_staged_async_save_holds_the_state_of_its_step_not_a_later_one(tmp_path, monkeypatch):
    """The writer copies live tensors on its own thread; wait_staged() is what keeps the next update out."""
    real_copy = ckpt.StagingArea.copy
    copying = threading.Event()

    def slow_copy(self, obj, path=()):
        if not path:  # once, before the whole copy (the copy recurses through this method)
            copying.set()
            time.sleep(0.3)  # a big state on a slow node: the trainer reaches its next update meanwhile
        return real_copy(self, obj, path)

    monkeypatch.setattr(ckpt.StagingArea, "copy", slow_copy)
    live = {"model": {"w": torch.zeros(3)}}
    writer = ckpt.CheckpointWriter(tmp_path, keep_last=10, asynchronous=True)
    writer.submit(ckpt.snapshot(1, 1, 1, 1, live, [ckpt.capture_rng_state()], copy=False), stage=True)
    assert copying.wait(5)
    writer.wait_staged()  # what Trainer.train_step() does before optimizer.step()
    live["model"]["w"] += 1
    writer.wait()
    path = tmp_path / "step-1"
    state = ckpt.load_checkpoint(path, ckpt.verify_checkpoint(path), 0, torch.device("cpu")).train_state
    assert torch.equal(state["model"]["w"], torch.zeros(3))


def test_staging_reuses_its_buffers_and_copies_values_not_references():
    area = ckpt.StagingArea()
    live = {"model": {"w": torch.arange(4.0)}, "optimizer": {"state": {0: {"step": torch.tensor(3.0)}}, "lr": [0.1]}}
    first = area.copy(live)
    live["model"]["w"] += 10
    assert torch.equal(first["model"]["w"], torch.arange(4.0)) and first["optimizer"]["lr"] == [0.1]
    second = area.copy(live)
    assert second["model"]["w"].data_ptr() == first["model"]["w"].data_ptr()  # no new allocation
    assert torch.equal(second["model"]["w"], torch.arange(4.0) + 10)
    live["model"]["w"] = torch.zeros(7)  # a changed shape gets a buffer of its own
    assert area.copy(live)["model"]["w"].shape == (7,)


def test_a_failed_background_write_surfaces_on_the_training_thread(tmp_path, monkeypatch):
    def broken(directory, s):
        raise OSError("disk full")

    monkeypatch.setattr(replicated, "write_checkpoint", broken)
    writer = ckpt.CheckpointWriter(tmp_path, keep_last=1, asynchronous=True)
    writer.submit(snap(1))
    with pytest.raises(Exception, match="disk full"):
        writer.wait()


def test_checkpoints_with_sha256_manifests_still_load_and_unknown_checksums_do_not(tmp_path):
    """Checkpoints written before the switch to XXH3-128 carry SHA-256 sums; they must stay resumable."""
    import hashlib

    path = ckpt.write_checkpoint(tmp_path, snap(7))
    manifest_path = path / ckpt.MANIFEST
    manifest = json.loads(manifest_path.read_text())
    assert all("xxh3_128" in entry for entry in manifest["files"].values())
    for name, entry in manifest["files"].items():
        del entry["xxh3_128"]
        entry["sha256"] = hashlib.sha256((path / name).read_bytes()).hexdigest()
    manifest_path.write_text(json.dumps(manifest))
    assert ckpt.verify_checkpoint(path)["step"] == 7
    manifest["files"][ckpt.STATE_FILE]["sha256"] = "0" * 64
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ckpt.CheckpointCorruptError, match="fails its sha256 checksum"):
        ckpt.verify_checkpoint(path)
    for entry in manifest["files"].values():
        entry["md5"] = entry.pop("sha256")
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ckpt.CheckpointCorruptError, match="no checksum this hpcml knows"):
        ckpt.verify_checkpoint(path)


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 3 * 4096 + 17])
def test_overlapped_digest_equals_one_pass_hashes(tmp_path, size):
    # Chunks of 4 KB: the reader thread fills one buffer while the other is hashed, across chunk edges.
    data = bytes((i * 7919) % 251 for i in range(size))
    (tmp_path / "f").write_bytes(data)
    for algorithm, new in CHECKSUMS.items():
        expected = new()
        expected.update(data)
        assert digest_of(tmp_path / "f", algorithm, chunk=4096) == expected.hexdigest()


def test_digest_of_a_missing_file_raises_and_leaves_no_thread(tmp_path):
    before = threading.active_count()
    with pytest.raises(FileNotFoundError):
        digest_of(tmp_path / "nope", "xxh3_128")
    assert threading.active_count() == before


def test_verify_and_load_returns_nothing_from_a_corrupt_checkpoint(tmp_path):
    path = ckpt.write_checkpoint(tmp_path, snap(4, 2.0))
    loaded = ckpt.verify_and_load(path, 0, CPU)
    assert torch.equal(loaded.train_state["model"]["w"], torch.full((4, 4), 2.0)) and loaded.step == 4
    # A flipped bit inside the tensor data loads fine; only the concurrent checksum can catch it.
    state = path / ckpt.STATE_FILE
    data = bytearray(state.read_bytes())
    data[data.index(torch.full((4, 4), 2.0).numpy().tobytes())] ^= 0x01
    state.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointCorruptError, match="train_state.pt fails its xxh3_128 checksum"):
        ckpt.verify_and_load(path, 0, CPU)
    # Garbage that cannot even be unpickled is reported as the corruption it is, not as a load error.
    state.write_bytes(b"\0" * len(data))
    with pytest.raises(ckpt.CheckpointCorruptError, match="fails its xxh3_128 checksum"):
        ckpt.verify_and_load(path, 0, CPU)


def test_only_states_with_gpu_tensors_are_staged_by_a_synchronous_writer():
    assert not ckpt.holds_gpu_tensors({"model": {"w": torch.zeros(2)}, "opt": [torch.zeros(1), 3], "x": None})
    assert ckpt.holds_gpu_tensors({"a": [{"b": torch.zeros(1, device="meta")}]})


def test_an_asynchronous_sharded_save_writes_the_state_of_its_step_not_what_training_did_next(
    process_group, tmp_path, monkeypatch
):
    """The background thread writes the copy made at the step boundary: the weights are changed after submit()
    returns and before DCP writes (its save waits for that), and the checkpoint holds the step's weights; the
    next save, refilling the same buffers, holds the new ones. One rank (the layout and the copy are the same
    at any count: the tests in test_fsdp.py resume 4 ranks from asynchronous saves)."""
    import threading

    from hpcml.compute.checkpoint import sharded

    # One event per save: a shared one cleared for the next step could be cleared before the previous
    # save's thread had looked at it.
    trained_on = {1: threading.Event(), 2: threading.Event()}
    waiting_saves = iter(trained_on.values())
    dcp_save = sharded.dcp.save

    def save_once_training_went_on(*args, **kwargs):
        assert next(waiting_saves).wait(30)
        return dcp_save(*args, **kwargs)

    monkeypatch.setattr(sharded.dcp, "save", save_once_training_went_on)
    model, fresh = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    writer = sharded.ShardedCheckpointWriter(tmp_path, keep_last=2, asynchronous=True, ctx=process_group)
    header = {"samples_consumed": 0, "global_batch_size": 8, "world_size": 1}
    saved = []
    for step in (1, 2):
        saved.append(model.weight.detach().clone())
        state = sharded.sharded_state(model, optimizer)
        writer.submit(sharded.ShardedSave(step, header, state, {}, ckpt.capture_rng_state()), wait=False)
        with torch.no_grad():
            model.weight.add_(1.0)  # training goes on while the save is written
        trained_on[step].set()
    writer.wait()
    for step, weight in zip((1, 2), saved, strict=True):
        path = tmp_path / f"step-{step}"
        assert ckpt.verify_checkpoint(path)["layout"] == "sharded"
        sharded.load_sharded_into(path, fresh, torch.optim.SGD(fresh.parameters(), lr=0.1))
        assert torch.equal(fresh.weight, weight), step


def test_shard_staging_refills_its_buffers_and_gives_a_scalar_dtensor_one_of_its_own(process_group):
    """Each copy holds the live values of its moment, in the same buffers as the copy before. torch's
    allocator hands back a 0-dim DTensor itself rather than a buffer; the staging gives it one."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate

    from hpcml.compute.checkpoint.sharded import ShardStaging

    mesh = init_device_mesh("cpu", (1,))
    live = {
        "w": torch.zeros(4, 4),
        "scale": DTensor.from_local(torch.tensor(1.0), mesh, [Replicate()]),
        "groups": [{"lr": 0.1, "step": torch.tensor(3.0)}],
    }
    staging = ShardStaging()
    first = staging.copy(live)
    pointers = (first["w"].data_ptr(), first["scale"].to_local().data_ptr(), first["groups"][0]["step"].data_ptr())
    live["w"].add_(2.0)
    live["scale"].to_local().add_(5.0)
    live["groups"][0]["step"].add_(1.0)
    assert float(first["scale"].to_local()) == 1.0  # not the live scalar
    second = staging.copy(live)
    assert pointers == (
        second["w"].data_ptr(),
        second["scale"].to_local().data_ptr(),
        second["groups"][0]["step"].data_ptr(),
    )
    assert torch.equal(second["w"], torch.full((4, 4), 2.0)) and float(second["scale"].to_local()) == 6.0
    assert float(second["groups"][0]["step"]) == 4.0 and second["groups"][0]["lr"] == 0.1
    live["w"] = torch.zeros(2, 2)  # another layout: new buffers
    assert staging.copy(live)["w"].shape == (2, 2)


def test_a_failed_asynchronous_sharded_save_is_raised_on_the_training_thread_once(process_group, tmp_path, monkeypatch):
    """A write that fails on the background thread (a full disk) is raised by the next wait(), once, naming
    the folder; it commits nothing, and the next save is written as if nothing had happened. A folder that
    cannot be made fails submit() itself, on the training thread."""
    from hpcml.compute.checkpoint import sharded
    from hpcml.errors import HpcmlError

    model = torch.nn.Linear(8, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    header = {"samples_consumed": 0, "global_batch_size": 8, "world_size": 1}

    def submit(writer, step: int) -> None:
        state = sharded.sharded_state(model, optimizer)
        writer.submit(sharded.ShardedSave(step, header, state, {}, ckpt.capture_rng_state()), wait=False)

    dcp_save, calls = sharded.dcp.save, []

    def full_disk_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise OSError(28, "No space left on device")
        return dcp_save(*args, **kwargs)

    monkeypatch.setattr(sharded.dcp, "save", full_disk_once)
    writer = sharded.ShardedCheckpointWriter(tmp_path / "checkpoints", 1, asynchronous=True, ctx=process_group)
    submit(writer, 3)
    with pytest.raises(HpcmlError, match="writing a sharded checkpoint to .*checkpoints failed: .*No space left"):
        writer.wait()
    writer.wait()  # raised once
    submit(writer, 4)
    writer.close()  # committed, and the failed save's partial folder pruned
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "checkpoints")] == ["step-4"]

    (tmp_path / "a-file").write_text("")
    with pytest.raises(OSError):
        submit(sharded.ShardedCheckpointWriter(tmp_path / "a-file", 1, asynchronous=True, ctx=process_group), 5)


@pytest.mark.parametrize("layout", ["replicated", "sharded"])
def test_old_checkpoints_are_deleted_on_a_thread_the_next_save_and_close_wait_for(
    layout, tmp_path, monkeypatch, request
):
    """A synchronous save returns once committed, while the checkpoint it made old is still being deleted;
    the next save starts only after that deletion (a prune also removes partial folders: the new save's own,
    were it made first), and close() returns only after it."""
    from hpcml.compute.checkpoint import layout as folder_layout
    from hpcml.compute.checkpoint import sharded

    released, pruning = threading.Event(), threading.Event()
    prune = folder_layout.prune_checkpoints

    def slow_prune(directory, keep_last):
        pruning.set()
        released.wait(30)  # on the prune's thread: the test's own thread makes the checks
        prune(directory, keep_last)

    monkeypatch.setattr(folder_layout, "prune_checkpoints", slow_prune)
    if layout == "replicated":
        writer = ckpt.CheckpointWriter(tmp_path, keep_last=1, asynchronous=False)

        def save(step: int) -> None:
            writer.submit(snap(step))
    else:
        ctx = request.getfixturevalue("process_group")
        writer = sharded.ShardedCheckpointWriter(tmp_path, 1, asynchronous=False, ctx=ctx)
        model = torch.nn.Linear(8, 4)
        state = sharded.sharded_state(model, torch.optim.SGD(model.parameters(), lr=0.1))
        header = {"samples_consumed": 0, "global_batch_size": 8, "world_size": 1}

        def save(step: int) -> None:
            writer.submit(sharded.ShardedSave(step, header, state, {}, ckpt.capture_rng_state()), wait=True)

    save(1)
    assert pruning.wait(30)  # save(1) returned with its prune under way
    second = threading.Thread(target=save, args=(2,))
    second.start()
    time.sleep(0.5)
    assert second.is_alive() and not list(tmp_path.glob("*step-2*"))  # waiting for the prune, nothing written
    released.set()
    second.join(30)
    writer.close()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-2"]
    assert not list(tmp_path.glob(".step-*.partial"))


def _equal_states(a, b) -> bool:
    """Same keys in the same order, equal values; tensors compared by their local values."""
    from torch.distributed.tensor import DTensor

    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_equal_states(v, b[k]) for k, v in a.items())
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal_states(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor):
        local = lambda t: t.to_local() if isinstance(t, DTensor) else t  # noqa: E731
        return type(a) is type(b) and torch.equal(local(a), local(b))
    return a == b


def test_state_by_name_asks_torch_once_and_renames_from_then_on(process_group, monkeypatch):
    """A sharded model's state, read at every save: equal to torch's get_state_dict each time (this step's
    values, the learning rate as it is now), with torch asked only at the first read and again, once, when
    the optimizer or the model holds other parameters."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from hpcml.compute.checkpoint import sharded

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    mesh = init_device_mesh("cpu", (1,))
    for block in (model[0], model[2], model):
        fully_shard(block, mesh=mesh)
    optimizer = torch.optim.Adam(model[0].parameters(), lr=0.1)
    model(torch.randn(4, 8)).sum().backward()
    optimizer.step()
    asked = []
    monkeypatch.setattr(sharded, "get_state_dict", lambda *a: asked.append(1) or get_state_dict(*a))
    reader = sharded.StateByName(model, optimizer)

    def torchs():
        return get_state_dict(model, optimizer)

    for _ in range(3):
        model(torch.randn(4, 8)).sum().backward()
        optimizer.step()
        optimizer.param_groups[0]["lr"] *= 0.5
        read, (model_state, optimizer_state) = reader.read(), torchs()
        assert _equal_states(read, {"model": model_state, "optimizer": optimizer_state})
    assert read["optimizer"]["param_groups"][0]["lr"] == 0.1 * 0.5**3
    assert "0.weight" in read["model"] and "0.weight" in read["optimizer"]["state"]
    assert len(asked) == 1

    optimizer.add_param_group({"params": list(model[2].parameters()), "lr": 0.01})
    model(torch.randn(4, 8)).sum().backward()
    optimizer.step()
    for _ in range(2):
        assert _equal_states(reader.read(), dict(zip(("model", "optimizer"), torchs(), strict=True)))
    assert len(asked) == 2  # the optimizer holds other parameters: torch is asked again, once

    model[0].register_parameter("scale", torch.nn.Parameter(torch.ones(1)))
    assert "0.scale" in reader.read()["model"]
    assert len(asked) == 3  # so does a model with another parameter


def test_state_by_name_asks_torch_every_time_where_torch_renames_keys(process_group, monkeypatch):
    """A DDP-wrapped model's keys carry `module.`, which torch's answer drops: renaming the optimizer's
    indices alone would not give torch's answer, so every read is torch's."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.nn.parallel import DistributedDataParallel

    from hpcml.compute.checkpoint import sharded

    model = DistributedDataParallel(torch.nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 8)).sum().backward()
    optimizer.step()
    asked = []
    monkeypatch.setattr(sharded, "get_state_dict", lambda *a: asked.append(1) or get_state_dict(*a))
    reader = sharded.StateByName(model, optimizer)
    for _ in range(2):
        read = reader.read()
        assert list(read["model"]) == ["weight", "bias"]
        assert read["optimizer"]["param_groups"][0]["params"] == ["weight", "bias"]
    assert len(asked) == 2
