import datetime

import pytest
import torch
import torch.distributed as dist

from hpcml.compute.dist import (
    gpu_sharing_ranks,
    make_store,
    require_nccl_error_handling,
    select_backend,
    select_device,
)
from hpcml.compute.env import ProcessPlacement, SingleProcessEnvironment, TorchrunEnvironment
from hpcml.errors import ConfigError, RendezvousError

ONE = ProcessPlacement(0, 1, 0, 1, 0, 1)
FOUR_ON_NODE = ProcessPlacement(6, 8, 2, 4, 1, 2)


def test_auto_backend_follows_cuda():
    assert select_backend("auto", cuda_available=True) == "nccl"
    assert select_backend("auto", cuda_available=False) == "gloo"
    assert select_backend("gloo", cuda_available=True) == "gloo"


def test_nccl_without_cuda_is_refused_with_a_fix():
    with pytest.raises(ConfigError, match="train.backend=gloo"):
        select_backend("nccl", cuda_available=False)


def test_each_nccl_rank_gets_its_local_gpu():
    assert select_device("nccl", FOUR_ON_NODE, cuda_device_count=4) == torch.device("cuda", 2)
    # A site that binds one GPU per task exposes exactly one device to each.
    assert select_device("nccl", FOUR_ON_NODE, cuda_device_count=1) == torch.device("cuda", 0)
    assert select_device("gloo", FOUR_ON_NODE, cuda_device_count=4) == torch.device("cpu")


def test_too_few_gpus_for_the_ranks_on_a_node():
    with pytest.raises(ConfigError, match="4 ranks on this node but only 2 GPUs"):
        select_device("nccl", FOUR_ON_NODE, cuda_device_count=2)


TIMEOUT = datetime.timedelta(seconds=10)


def test_single_process_needs_no_network():
    assert isinstance(make_store(SingleProcessEnvironment({}), ONE, TIMEOUT), dist.HashStore)


def test_master_addr_and_port_from_the_environment_win(monkeypatch):
    probe = dist.TCPStore("127.0.0.1", 0, 1, True, timeout=TIMEOUT, wait_for_workers=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(probe.port))
    store = make_store(SingleProcessEnvironment({}), ProcessPlacement(1, 2, 0, 1, 1, 2), TIMEOUT)
    store.set("hello", "world")
    assert probe.get("hello") == b"world"


def test_no_mpi_and_no_master_addr_is_explained(monkeypatch):
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    env = TorchrunEnvironment({"TORCHELASTIC_RUN_ID": "x", "RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(RendezvousError, match="export MASTER_ADDR and MASTER_PORT"):
        make_store(env, ProcessPlacement(0, 2, 0, 1, 0, 2), TIMEOUT)


def test_ranks_that_share_a_gpu_are_found_through_the_store():
    store = dist.HashStore()
    # Node a: local ranks 0 and 2 (global 4 and 6) were given the same GPU; local rank 1 has its own.
    store.set("hpcml/gpu/a/1", "5 GPU-bbb")
    store.set("hpcml/gpu/a/2", "6 GPU-aaa")
    store.set("hpcml/gpu/b/0", "0 GPU-aaa")  # another node's GPU with the same id is another GPU's problem
    placement = ProcessPlacement(4, 8, 0, 3, 1, 2)
    assert gpu_sharing_ranks(store, placement, "a", "GPU-aaa") == [4, 6]
    assert gpu_sharing_ranks(store, ProcessPlacement(5, 8, 1, 3, 1, 2), "a", "GPU-bbb") == [5]


def test_nccl_error_handling_turned_off_by_a_site_is_turned_back_on(caplog):
    """Off (0), a hung NCCL collective would never end; torch's default (3, unset) and other modes stay."""
    environ = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "0"}
    require_nccl_error_handling(environ)
    assert environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3" and "would let a hung NCCL collective" in caplog.text
    for kept in ({}, {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}):
        before = dict(kept)
        require_nccl_error_handling(kept)
        assert kept == before
