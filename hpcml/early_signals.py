"""Remember a Slurm warning that arrives while a rank is still starting up.

Importing torch and friends takes seconds, and until PreemptionGuard is installed USR2's default action
would kill the rank (a time-limit warning can come that early). Inside a launched job (srun, mpirun)
importing hpcml installs a recorder for USR2 and TERM where no handler is set; the guard then picks up
what it saw. On a login node nothing is installed. No heavy imports here: this must run first.
"""

import os
import signal

SEEN: list[int] = []
_LAUNCHED_MARKERS = ("SLURM_STEP_ID", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def parse_signal(name: str) -> signal.Signals:
    """USR2, SIGUSR2 or usr2 -> signal.SIGUSR2 (here, not in hpcml.preempt, so that config validation
    on the login node needs no torch)."""
    text = name.upper()
    text = text if text.startswith("SIG") else f"SIG{text}"
    try:
        return signal.Signals[text]
    except KeyError:
        raise ValueError(f"unknown signal {name!r}") from None


def _record(signum, frame) -> None:
    SEEN.append(signum)


def install_if_launched(environ=os.environ) -> bool:
    if not any(marker in environ for marker in _LAUNCHED_MARKERS):
        return False
    for sig in (signal.SIGUSR2, signal.SIGTERM):
        if signal.getsignal(sig) in (signal.SIG_DFL, None):
            signal.signal(sig, _record)
    return True
