"""Real-cluster tests: every test here runs against the local Slurm cluster (`make cluster-up`)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import ROOT


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/cluster/" in str(item.fspath):
            item.add_marker(pytest.mark.cluster)


@pytest.fixture(scope="session", autouse=True)
def local_cluster():
    """Bring the cluster up if it is not (idempotent, seconds when it already runs)."""
    done = subprocess.run(
        [sys.executable, "-m", "hpcml.localcluster", "up", "--state-dir", str(ROOT / ".cluster")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != 0:
        pytest.fail(f"the local cluster did not come up:\n{done.stdout}\n{done.stderr}")
