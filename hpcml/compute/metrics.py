"""Training metrics for people and programs: JSONL lines, TensorBoard scalars, a progress bar.

Only rank 0 writes; other ranks get a writer that does nothing, so call sites need no rank checks.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from hpcml.outputs import METRICS_FILE

log = logging.getLogger(__name__)


class MetricsWriter:
    def __init__(self, output_dir: Path, enabled: bool, total_steps: int, first_step: int = 0):
        self.enabled = enabled
        self._jsonl = None
        self._tensorboard = None
        self._progress = None
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        # Append: a resumed run continues the same file.
        self._jsonl = open(output_dir / METRICS_FILE, "a", buffering=1)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(log_dir=str(output_dir / "tensorboard"))
        except ImportError:  # tensorboard is a dependency; a broken install must not stop training
            log.warning("tensorboard is not importable; writing JSONL metrics only")
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._progress = tqdm(total=total_steps, initial=first_step, unit="step", dynamic_ncols=True)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **metrics}
        self._jsonl.write(json.dumps(record) + "\n")
        if self._tensorboard is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self._tensorboard.add_scalar(key, value, step)
        if self._progress is not None:
            self._progress.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if isinstance(v, float)})
        else:
            log.info("step %d %s", step, " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float)))

    def advance(self, steps: int = 1) -> None:
        if self._progress is not None:
            self._progress.update(steps)

    def close(self) -> None:
        for closable in (self._progress, self._tensorboard, self._jsonl):
            if closable is not None:
                closable.close()
