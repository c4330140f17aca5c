"""Every error hpcml raises on purpose: one class per kind of problem, each message says the fix."""

import sys


class HpcmlError(Exception):
    """Base class: something a user can act on, described in the message."""


class ConfigError(HpcmlError, ValueError):
    """A config value is invalid or inconsistent; raised on the login node before anything is submitted."""


class EnvironmentDetectionError(HpcmlError):
    """No launcher environment matched, or the variables of the one that did are malformed."""


class RendezvousError(HpcmlError):
    """The ranks could not agree on a rendezvous address or start torch.distributed."""


class SubmissionError(HpcmlError):
    """Slurm refused the job, or the cluster lacks what the config asks for."""


class CollectiveTimeout(HpcmlError):
    """Some rank did not reach a collective in time: it is stuck, or died without taking the job down."""


class ReplicasDivergedError(HpcmlError):
    """Data-parallel replicas ended with different parameters: the run's result cannot be trusted."""


class NonFiniteLossError(HpcmlError):
    """The loss became NaN or infinite: training stops before anything non-finite is saved."""


class DataError(HpcmlError):
    """The training data is missing or not in the expected format."""


# The exit status of a command refused for bad input (a config, a path, a cluster that lacks something).
EXIT_BAD_INPUT = 2


def report_error(err: HpcmlError) -> int:
    """How every entry point ends on an HpcmlError: one line naming the problem and the fix, no traceback."""
    print(f"error: {err}", file=sys.stderr)
    return EXIT_BAD_INPUT
