"""Shared fixtures."""

import os
import tempfile
from pathlib import Path

import pytest
from helpers import ROOT


def is_cluster_test(item) -> bool:
    return "tests/cluster/" in str(item.fspath)


# tryfirst: pytest-xdist reads the mark in a hook of its own, which runs before this file's hooks unless told.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    """With pytest-xdist's `-n 2 --dist loadgroup` (README, Dependencies) the real-cluster tests go to one
    worker, in file order, and everything else to the other. Two groups, not more: the cluster tests share one
    cluster (some restart it with another site's policy) and must not overlap beyond what `together` runs, and
    the local tests use both cores while the cluster's jobs mostly wait on Slurm's start-up and requeue
    delays. Without `-n`, as `make test-fast` runs, the mark does nothing."""
    for item in items:
        group = "cluster" if is_cluster_test(item) else "local"
        item.add_marker(pytest.mark.xdist_group(group))


# Niceness of the local tests' worker under pytest-xdist: the cluster's daemons and jobs (started by
# `make cluster-up`, so at niceness 0) and the cluster tests' worker come first, and the local tests fill the
# time they leave. Seen at equal priority on 2 cores: slurmd missed the controller's RPCs ("Socket timed out"),
# a job's attempt stopped on a signal no test had sent it, and the cluster tests, the suite's critical path,
# ran up to twice as long as alone.
LOCAL_TESTS_NICENESS = 10


def pytest_runtest_setup(item):
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return
    wanted = 0 if is_cluster_test(item) else LOCAL_TESTS_NICENESS
    try:
        os.setpriority(os.PRIO_PROCESS, 0, wanted)  # the tests' subprocesses inherit it
    except PermissionError:
        pass  # not root: niceness cannot go back down; a worker's tests then all run at the one it has


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
