"""Where a rank's large freed blocks of host memory go: back to the OS at once, or into glibc's heap for reuse.

glibc hands out big blocks with mmap and returns them on free, until a block that size has been freed: then
it raises its threshold (up to 32 MiB) and serves that size from its heap, which keeps freed memory for reuse.
FSDP on CPUs gathers each unit's parameters and frees them again every step, so under that default its
ranks peaked above DDP's, sharding notwithstanding. Fixing the threshold (which turns the adjustment off)
returns those blocks to the OS at once, at the price of fresh pages on every allocation: slower steps.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Callable, Mapping

import torch

log = logging.getLogger(__name__)

# train.freed_host_memory's values (hpcml.config.FREED_HOST_MEMORY).
AUTO, RETURN, KEEP = "auto", "return", "keep"
M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
# glibc's own starting threshold: blocks of 128 KiB or more are mmapped, and unmapped when freed.
RETURN_THRESHOLD_BYTES = 128 * 1024
# The environment's ways of setting glibc's thresholds itself (each turns the dynamic threshold off too).
THRESHOLD_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
THRESHOLD_TUNABLES = ("mmap_threshold", "trim_threshold", "top_pad", "mmap_max")

# Whether this process fixed the threshold already: glibc cannot be given its dynamic threshold back.
_fixed = False


def resolve(policy: str, grad_sync: str, device: torch.device) -> str:
    """RETURN or KEEP for train.freed_host_memory=`policy`: auto returns it for FSDP on CPUs, where the
    parameters live in host memory and sharding them is meant to save it."""
    if policy != AUTO:
        return policy
    return RETURN if grad_sync == "fsdp" and device.type == "cpu" else KEEP


def set_by_environment(environ: Mapping[str, str]) -> str | None:
    """The variable by which this process's environment already set glibc's thresholds, if any."""
    for name in THRESHOLD_VARIABLES:
        if name in environ:
            return name
    tunables = environ.get("GLIBC_TUNABLES", "")
    if any(f"glibc.malloc.{name}=" in tunables for name in THRESHOLD_TUNABLES):
        return "GLIBC_TUNABLES"
    return None


def glibc_mallopt() -> Callable[[int, int], int] | None:
    """glibc's mallopt, from the C library this process already has loaded; None where that has none."""
    try:
        return ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None


def apply(
    policy: str,
    grad_sync: str,
    device: torch.device,
    environ: Mapping[str, str] = os.environ,
    find_mallopt: Callable[[], Callable[[int, int], int] | None] = glibc_mallopt,
) -> str:
    """Set this process's allocator as train.freed_host_memory asks (before the model is built: blocks
    allocated earlier keep their kind); returns what holds now, for the log. Forked children (DataLoader
    workers) inherit it."""
    global _fixed
    wanted = resolve(policy, grad_sync, device)
    variable = set_by_environment(environ)
    if variable is not None:
        return f"freed host memory is left as {variable} in the environment sets it (train.freed_host_memory={policy})"
    if _fixed:
        return (
            "freed host memory returns to the OS at once, as an earlier run in this process set it (glibc's "
            f"threshold stays fixed; train.freed_host_memory={policy})"
        )
    if wanted == KEEP:
        return f"freed host memory stays in glibc's heap for reuse (its default; train.freed_host_memory={policy})"
    mallopt = find_mallopt()
    if mallopt is None or mallopt(M_MMAP_THRESHOLD, RETURN_THRESHOLD_BYTES) != 1:
        log.warning(
            "train.freed_host_memory=%s: this C library has no glibc mallopt, or it refused the threshold, so freed "
            "host memory stays wherever its allocator keeps it; set train.freed_host_memory=keep to silence this.",
            policy,
        )
        return "freed host memory: the C library's default (glibc's mallopt missing or refused)"
    _fixed = True
    return (
        "freed host memory returns to the OS at once: blocks of 128 KiB or more are unmapped when freed "
        f"(train.freed_host_memory={policy}; keep is faster and holds more memory)"
    )
