"""Signal names as users write them (USR2, SIGUSR2, usr2): shared by config validation and the signal
recorder each rank installs first thing, so it imports nothing but the standard library."""

import signal


def parse_signal(name: str) -> signal.Signals:
    """USR2, SIGUSR2 or usr2 -> signal.SIGUSR2; ValueError for a name that is not a signal."""
    text = name.upper()
    text = text if text.startswith("SIG") else f"SIG{text}"
    try:
        return signal.Signals[text]
    except KeyError:
        raise ValueError(f"unknown signal {name!r}") from None
