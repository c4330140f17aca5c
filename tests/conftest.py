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
