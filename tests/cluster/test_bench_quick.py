"""`python -m hpcml.bench --quick` end to end: every benchmark runs on the real ranks, disk and cluster
and reports finite figures, each with its baseline from the same run. (Targets are not asserted here:
a shared CI machine's timings are for reading, not for failing builds.)"""

import json
import math
import subprocess

import torch
from helpers import PYTHON, ROOT, mpi_env

from hpcml.bench.__main__ import BENCHMARKS


def test_quick_benchmarks_write_results_and_a_summary(tmp_path):
    done = subprocess.run(
        [PYTHON, "-m", "hpcml.bench", "--quick", "--results-dir", str(tmp_path)],
        cwd=ROOT,
        env=mpi_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    summary = (tmp_path / "summary.md").read_text()
    for name in BENCHMARKS:
        if name == "gpu" and not torch.cuda.is_available():
            # Skipped, said so, and no result (not even an old one) left to pass for this run's.
            assert "skipped: no CUDA device visible" in done.stdout
            assert not (tmp_path / "gpu.json").exists() and "| gpu |" not in summary
            continue
        record = json.loads((tmp_path / f"{name}.json").read_text())
        assert record["quick"] and record["figures"], name
        for figure in record["figures"]:
            assert math.isfinite(figure["value"]) and figure["value"] > 0, figure
            assert math.isfinite(figure["baseline"]) and figure["baseline"] > 0, figure
            assert f"| {name} | {figure['name']} |" in summary
    allreduce = json.loads((tmp_path / "allreduce.json").read_text())
    # hpcml's DDP path is measured on the transport its probe chose, which must be a real one.
    assert {row["ddp_transport"] for row in allreduce["measurements"]} <= {"torch", "mpi"}
    assert {row["flat_transport"] for row in allreduce["measurements"]} <= {"torch", "mpi"}
