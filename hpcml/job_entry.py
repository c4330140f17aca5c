"""What crosses sbatch: the picklable callable the login node submits and every rank of the job calls.

Built by hpcml.login.launch (which never imports torch), called by submitit on the compute node; the
compute half is imported only then.
"""

from __future__ import annotations

from typing import Any


class TrainingJob:
    """Rebuild the config on the rank, run the runtime; a stopped or failed rank exits with its status."""

    def __init__(self, config: dict[str, Any]):
        self.config = config

    def __call__(self) -> int:
        from hpcml.compute import early_signals

        # submitit set its own TERM and USR2 handlers just now; a stop must be recorded, not ignored.
        early_signals.install()
        from hpcml.compute.runtime import run_job

        return run_job(self.config)
