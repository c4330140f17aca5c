"""Remember a stop signal that arrives while a rank is still starting up.

Importing torch and friends takes seconds, and until PreemptionGuard is installed the default action of
USR2 or TERM would kill the rank (a time-limit warning or a preemption can come that early). hpcml's own
entry points (jobs/train.py, hpcml.compute.submitit_main, hpcml.job_entry) call `install` first thing;
the guard then picks up what it saw. Nothing here runs on import, and there are no heavy imports: this
must run before anything slow.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping

from hpcml.signal_names import parse_signal

SEEN: list[int] = []
_LAUNCHED_MARKERS = ("SLURM_STEP_ID", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
# The stop signal the batch shell forwards (hpcml/compute/batch_shell.sh), when it is not USR2.
STOP_SIGNAL_ENV = "HPCML_STOP_SIGNAL"


def _record(signum, frame) -> None:
    SEEN.append(signum)


def install(environ: Mapping[str, str] = os.environ) -> None:
    """Record USR2, TERM and the job's configured stop signal instead of dying of them. Replaces whatever
    handler is set: submitit installs its own (TERM ignored, USR2 requeues) before it calls hpcml."""
    signals = {signal.SIGUSR2, signal.SIGTERM}
    name = environ.get(STOP_SIGNAL_ENV)
    if name:
        signals.add(parse_signal(name))
    for sig in signals:
        signal.signal(sig, _record)


def install_if_launched(environ: Mapping[str, str] = os.environ) -> bool:
    """`install` inside a launched job (srun, mpirun); on a login node, or in a plain process, nothing."""
    if not any(marker in environ for marker in _LAUNCHED_MARKERS):
        return False
    install(environ)
    return True
