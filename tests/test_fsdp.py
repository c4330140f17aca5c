"""Sharded training (train.grad_sync=fsdp): N ranks compute what one process computes on the global batch,
and sharded checkpoints load at any world size, into DDP runs, and DDP's checkpoints into sharded runs.

Across world sizes the reductions add the same numbers in another order, so models agree to float precision
(rtol 1e-4), not bitwise; bitwise resume at the same world size is proven on the cluster.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import read_result, run_train
from user_code import USE, DeclaredUnits, TwoHeads

from hpcml.compute import checkpoint as ckpt
from hpcml.compute.fsdp import shard_units
from hpcml.compute.models import MLP
from hpcml.errors import ConfigError

# Adam, clipping and a checkpoint every 20 steps: step-20 is where the resharding tests start from.
RUN = [
    "train.steps=40",
    "train.global_batch_size=64",
    "train.log_every=20",
    "optim=adam",
    "train.clip_grad_norm=0.5",
    "checkpoint.every_steps=20",
]
FSDP = "train.grad_sync=fsdp"


def train(out: Path, ranks: int, *extra: str) -> Path:
    run_train([*RUN, *extra, f"train.output_dir={out}", f"hydra.run.dir={out}"], ranks=ranks)
    return out


def assert_same_model(out: Path, expected_out: Path) -> None:
    got = torch.load(out / "model.pt", weights_only=True)
    expected = torch.load(expected_out / "model.pt", weights_only=True)
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-4, atol=1e-5, msg=f"{name} differs")


def rank0_log(out: Path) -> str:
    return (out / "train.log").read_text()


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    """The built-in model on one process; its checkpoints are in the replicated layout."""
    return train(tmp_path_factory.mktemp("one"), 1)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    """The same run on 4 ranks under FSDP, each rank's share in 2 micro-batches, saving asynchronously every
    10 steps (checkpoint.keep_last=3: step-20, -30 and -40 stay). The resume tests start from its step-20:
    asynchronous saves are proven by resuming from them. (Synchronous sharded saves: the cluster tests.)"""
    return train(
        tmp_path_factory.mktemp("sharded"),
        4,
        FSDP,
        "train.grad_accum_steps=2",
        "checkpoint.async_save=true",
        "checkpoint.every_steps=10",
    )


@pytest.mark.mpi
def test_four_sharded_ranks_with_accumulation_equal_one_process(one_process, sharded):
    assert_same_model(sharded, one_process)
    result = read_result(sharded)
    assert (result["world_size"], result["grad_sync"]) == (4, "fsdp")
    # Each parameter lives on one rank: there are no replicas to compare, and result.json says so.
    assert result["replicas_identical"] is None and result["rank_params_sha256"] is None
    whole = torch.load(sharded / "model.pt", weights_only=True)
    names = [n for n in whole if "running" not in n and "num_batches" not in n]
    assert result["params_sha256"] == sha256_of(whole[n] for n in names)
    kept = sorted(p.name for p in ckpt.list_checkpoints(sharded / "checkpoints"))
    assert kept == ["step-20", "step-30", "step-40"], kept
    for name in kept:
        ckpt.verify_checkpoint(sharded / "checkpoints" / name)
    manifest = ckpt.verify_checkpoint(sharded / "checkpoints" / "step-40")
    assert (manifest["layout"], manifest["world_size"]) == ("sharded", 4)
    shards = {name for name in manifest["files"] if name.startswith("shards/")}
    assert shards == {"shards/.metadata", *(f"shards/__{rank}_0.distcp" for rank in range(4))}
    assert "'model'" not in str(
        torch.load(sharded / "checkpoints" / "step-40" / ckpt.STATE_FILE, weights_only=True).keys()
    )


def sha256_of(tensors) -> str:
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(t.to(torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.mpi
def test_a_users_model_trains_sharded_on_four_ranks_as_on_one_process(tmp_path):
    """tests/user_code.py's TwoHeads: its heads (an nn.ModuleList) become FSDP units by the default policy."""
    user = [*USE, "data.train.size=1024"]
    one = train(tmp_path / "one", 1, *user)
    four = train(tmp_path / "four", 4, *user, FSDP, "train.grad_accum_steps=2")
    assert_same_model(four, one)
    assert "FSDP: 2 units and the root, over 4 ranks" in rank0_log(four)


@pytest.mark.mpi
def test_a_sharded_checkpoint_reshards_four_to_two_to_four_and_four_to_one_to_the_four_rank_result(sharded, tmp_path):
    """Saved at 4 ranks (step 20), resumed at 2 (which saves at step 30) and at 1; the 2-rank step-30 resumed at
    4 again: every run ends at the 4-rank result."""
    for ranks in (2, 1):
        out = train(
            tmp_path / f"at{ranks}",
            ranks,
            FSDP,
            f"checkpoint.resume={sharded / 'checkpoints' / 'step-20'}",
            "checkpoint.every_steps=10",
        )
        assert read_result(out)["resumed_from_step"] == 20 and read_result(out)["world_size"] == ranks
        assert f"(step 20, 1280 samples; written by 4 ranks, sharded, now {ranks})" in rank0_log(out)
        assert_same_model(out, sharded)
    back = train(tmp_path / "back", 4, FSDP, f"checkpoint.resume={tmp_path / 'at2' / 'checkpoints' / 'step-30'}")
    assert "(step 30, 1920 samples; written by 2 ranks, sharded, now 4)" in rank0_log(back)
    assert_same_model(back, sharded)


@pytest.mark.mpi
def test_sharded_and_replicated_checkpoints_load_into_each_other(one_process, sharded, tmp_path):
    """A sharded checkpoint into a 2-rank replicated run, and a one-process (replicated) one into a 2-rank FSDP
    run: each continues to the end of the run that wrote it, Adam's moments included. The replicated run is
    the flat sync's, the harder case of the two (DDP loads the same way): its gradients exist before the
    load, and torch lays out no optimizer state for DCP to fill while they do."""
    flat = train(
        tmp_path / "flat", 2, "train.grad_sync=flat", f"checkpoint.resume={sharded / 'checkpoints' / 'step-20'}"
    )
    assert "written by 4 ranks, sharded, now 2" in rank0_log(flat)
    assert_same_model(flat, sharded)
    fsdp = train(tmp_path / "fsdp", 2, FSDP, f"checkpoint.resume={one_process / 'checkpoints' / 'step-20'}")
    assert "written by 1 ranks, replicated, now 2" in rank0_log(fsdp)
    assert_same_model(fsdp, one_process)


@pytest.mark.mpi
def test_a_truncated_or_missing_shard_is_detected_and_the_previous_checkpoint_used(sharded, tmp_path):
    damaged = {}
    for kind in ("truncated", "missing", "flipped"):
        copy = tmp_path / kind
        shutil.copytree(sharded / "checkpoints", copy)
        shard = copy / "step-40" / "shards" / "__1_0.distcp"
        if kind == "truncated":
            shard.write_bytes(shard.read_bytes()[:-100])
        elif kind == "missing":
            shard.unlink()
        else:
            data = bytearray(shard.read_bytes())
            data[len(data) // 2] ^= 0xFF
            shard.write_bytes(bytes(data))
        damaged[kind] = copy
    expected = {"truncated": "(truncated?)", "missing": "is missing", "flipped": "fails its xxh3_128 checksum"}
    for kind, copy in damaged.items():
        with pytest.raises(ckpt.CheckpointCorruptError, match=r"shards/__1_0\.distcp.*") as caught:
            ckpt.verify_checkpoint(copy / "step-40")
        assert expected[kind] in str(caught.value)
    # A run given the truncated copy says why it skips step-40, resumes from step-30 and ends where it should.
    out = train(tmp_path / "run", 2, FSDP, f"checkpoint.dir={damaged['truncated']}")
    log = rank0_log(out)
    assert "skipping checkpoint step-40: shards/__1_0.distcp has" in log
    assert read_result(out)["resumed_from_step"] == 30
    assert_same_model(out, sharded)


def test_units_are_what_the_model_declares_else_its_module_list_blocks_else_its_children():
    """fsdp.shard_units, the wrapping policy: a model's own fsdp_units(); the blocks of its ModuleLists (how
    transformers hold their layers); its children with parameters. A declared unit that is not part of the
    model is refused, naming it."""
    declared = DeclaredUnits()
    assert shard_units(declared) == [declared.body]
    two_heads = TwoHeads()
    assert shard_units(two_heads) == list(two_heads.heads)
    mlp = MLP(4, 3, width=8, depth=2)
    assert shard_units(mlp) == [mlp[0], mlp[2], mlp[4]]  # the Linear layers; ReLUs hold nothing
    with pytest.raises(ConfigError, match=r"DeclaredUnits.fsdp_units\(\) returned Linear, which are not submodules"):
        shard_units(DeclaredUnits(stray=True))


def test_manifest_layout_defaults_to_replicated_for_checkpoints_written_before_there_was_a_choice(tmp_path):
    snap = ckpt.snapshot(3, 3, 1, 1, {"model": {"w": torch.zeros(2)}}, [ckpt.capture_rng_state()], copy=True)
    path = ckpt.write_checkpoint(tmp_path, snap)
    manifest = json.loads((path / ckpt.MANIFEST).read_text())
    assert manifest["layout"] == "replicated"
    del manifest["layout"]
    (path / ckpt.MANIFEST).write_text(json.dumps(manifest))
    assert ckpt.layout_of(ckpt.verify_checkpoint(path)) == "replicated"
