"""`python -m hpcml.bench --quick` end to end, the benchmarks that run on this machine alone (the ones that
submit to Slurm: tests/cluster/test_bench_quick.py): each runs on real ranks and a real disk and reports
finite figures, each with its baseline from the same run. (Targets are not asserted here: a shared CI
machine's timings are for reading, not for failing builds.)"""

import json
import math
import statistics
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import PYTHON, ROOT, mpi_env

from hpcml.bench.__main__ import BENCHMARKS, NEEDS_CLUSTER


def quick_benchmarks_report_finite_figures(names: list[str], results_dir: Path) -> dict[str, dict]:
    """Runs `names` in quick mode; checks every figure of each and that the summary lists it. Returns the
    records by name."""
    done = subprocess.run(
        [PYTHON, "-m", "hpcml.bench", "--quick", "--results-dir", str(results_dir), "--only", *names],
        cwd=ROOT,
        env=mpi_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    summary = (results_dir / "summary.md").read_text()
    records = {}
    for name in names:
        if name == "gpu" and not torch.cuda.is_available():
            # Skipped, said so, and no result (not even an old one) left to pass for this run's.
            assert "skipped: no CUDA device visible" in done.stdout
            assert not (results_dir / "gpu.json").exists() and "| gpu |" not in summary
            continue
        record = records[name] = json.loads((results_dir / f"{name}.json").read_text())
        assert record["quick"] and record["figures"], name
        for figure in record["figures"]:
            assert math.isfinite(figure["value"]) and figure["value"] > 0, figure
            assert math.isfinite(figure["baseline"]) and figure["baseline"] > 0, figure
            assert f"| {name} | {figure['name']} |" in summary
    return records


@pytest.mark.mpi
def test_the_quick_benchmarks_that_need_no_cluster_write_results_and_a_summary(tmp_path):
    local = [name for name in BENCHMARKS if name not in NEEDS_CLUSTER]
    records = quick_benchmarks_report_finite_figures(local, tmp_path)
    # hpcml's DDP path is measured on the transport its probe chose, which must be a real one.
    allreduce = records["allreduce"]
    assert {row["ddp_transport"] for row in allreduce["measurements"]} <= {"torch", "mpi"}
    assert {row["flat_transport"] for row in allreduce["measurements"]} <= {"torch", "mpi"}
    # The host-memory runs set the allocator as their names say (each run is a process of its own).
    policies = {row["run"]: row["policy"] for row in records["host_memory"]["measurements"]}
    assert policies["fsdp, returned"].startswith("freed host memory returns to the OS at once")
    assert policies["fsdp, kept"].startswith("freed host memory stays in glibc's heap")
    # Each round's asynchronous stall is the median of that round's several saves.
    from hpcml.bench.sharding import STALLS_PER_ROUND

    (timed,) = [row for row in records["sharding"]["measurements"] if "async_stall_s" in row]
    assert [len(saves) for saves in timed["async_stalls_s_each"]] == [STALLS_PER_ROUND] * len(timed["async_stall_s"])
    assert timed["async_stall_s"] == [statistics.median(saves) for saves in timed["async_stalls_s_each"]]
