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
# Written by someone outside the job (a study's driver pruning the trial): rank 0 reads it at a step boundary,
# and the run stops there, saves, and ends successfully without being requeued.
STOP_REQUEST = "stop_request.json"


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
    """The value `launch.objective` names in a run's result.json, which optimizing sweepers read: one of the
    task's evaluation metrics (result["metrics"]), or a figure of the run itself (final_loss, samples_per_s)."""
    metrics = result.get("metrics") or {}
    if name in metrics:
        return float(metrics[name])
    if isinstance(result.get(name), (int, float)) and not isinstance(result.get(name), bool):
        return float(result[name])
    numbers = sorted(metrics) + sorted(
        k for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in metrics
    )
    raise ConfigError(f"launch.objective={name} is not in result.json; pick one of: {', '.join(numbers)}.")


def sweeper_needs_objective(sweeper_target: str) -> bool:
    """Whether a Hydra sweeper reads each run's objective: an optimizing one (Optuna) does; Hydra's basic
    sweeper and hpcml's own (which only enumerates trials) do not, so a run need not name one."""
    return not sweeper_target.endswith(("BasicSweeper", "HpcmlSweeper"))


def read_objective(output_dir: Path, name: str) -> float | None:
    """`objective` of the run in output_dir; None when it wrote no result (it stopped, or failed)."""
    path = Path(output_dir) / RESULT_FILE
    return objective(json.loads(path.read_text()), name) if path.is_file() else None
