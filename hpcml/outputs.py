"""Names of the files a run writes into its output directory, and the readers both halves share.

Their own module so that the login-node side (submission, `hpcml status`, sweeps) can find and read them
without importing the trainer, and with it torch: about a second of every login-node command.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hpcml.errors import ConfigError

# Rank 0's summary of a finished run (hpcml.compute.trainer.TrainingResult, plus every rank's checksum).
RESULT_FILE = "result.json"
# The final weights.
MODEL_FILE = "model.pt"
# Which Slurm job (and restart of it) last wrote the directory (hpcml.compute.runtime.record_job).
JOB_RECORD = "slurm_job.json"
# One JSON record per logged step (hpcml.compute.metrics.MetricsWriter).
METRICS_FILE = "metrics.jsonl"


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Every record of a metrics.jsonl, skipping a last line still being written; [] when there is none."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def objective(result: dict[str, Any], name: str) -> float:
    """The value `launch.objective` names in a run's result.json, which optimizing sweepers read."""
    if name not in result:
        raise ConfigError(f"launch.objective={name} is not in result.json; it holds: {', '.join(sorted(result))}.")
    return float(result[name])


def read_objective(output_dir: Path, name: str) -> float | None:
    """`objective` of the run in output_dir; None when it wrote no result (it stopped, or failed)."""
    path = Path(output_dir) / RESULT_FILE
    return objective(json.loads(path.read_text()), name) if path.is_file() else None
