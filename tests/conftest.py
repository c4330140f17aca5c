"""Shared fixtures."""

import tempfile
from pathlib import Path

import pytest
from helpers import ROOT


@pytest.fixture
def out_dir() -> Path:
    """A fresh output directory under outputs/, which every node of the local cluster can see."""
    base = ROOT / "outputs" / "test-runs"
    base.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=base))


@pytest.fixture
def process_group(monkeypatch):
    """A one-rank gloo process group in this process (on CPU), torn down afterwards."""
    from hpcml.compute.dist import setup_distributed, teardown_distributed
    from hpcml.compute.env import SingleProcessEnvironment

    monkeypatch.delenv("MASTER_ADDR", raising=False)
    yield setup_distributed(SingleProcessEnvironment({}), "gloo", 30)
    teardown_distributed()
