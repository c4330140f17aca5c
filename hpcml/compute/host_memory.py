"""Where a rank's large freed blocks of host memory go: back to the OS at once, or into glibc's heap for reuse.

glibc hands out big blocks with mmap and returns them on free, until a block that size has been freed: then
it raises its threshold (up to 32 MiB) and serves that size from its heap, which keeps freed memory for reuse.
FSDP on CPUs gathers each unit's parameters and frees them again every step, so under that default its
ranks peaked above DDP's, sharding notwithstanding. Fixing the threshold (which turns the adjustment off)
returns those blocks to the OS at once, at the price of fresh pages on every allocation: slower steps.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from collections.abc import Callable, Mapping

import torch

from hpcml.config import FREED_HOST_MEMORY

log = logging.getLogger(__name__)

AUTO, RETURN, KEEP = FREED_HOST_MEMORY
M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
# glibc's own starting threshold: blocks of 128 KiB or more are mmapped, and unmapped when freed.
RETURN_THRESHOLD_BYTES = 128 * 1024
# Settings with which glibc's user already chose (any of them turns the dynamic threshold off too).
GLIBC_MALLOC_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


def resolve(policy: str, grad_sync: str, device: torch.device) -> str:
    """RETURN or KEEP for train.freed_host_memory=`policy`: auto returns it for FSDP on CPUs, where the
    parameters live in host memory and sharding them is meant to save it."""
    if policy != AUTO:
        return policy
    return RETURN if grad_sync == "fsdp" and device.type == "cpu" else KEEP


def chosen_by_environment(environ: Mapping[str, str]) -> str | None:
    """The variable by which this process's environment already set glibc's malloc, if any."""
    for name in GLIBC_MALLOC_VARIABLES:
        if name in environ:
            return name
    if "glibc.malloc." in environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES"
    return None


def glibc_mallopt() -> Callable[[int, int], int] | None:
    """glibc's mallopt, or None where the C library has none (musl, macOS)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or None).mallopt
    except (OSError, AttributeError):
        return None


def apply(
    policy: str,
    grad_sync: str,
    device: torch.device,
    environ: Mapping[str, str] = os.environ,
    mallopt: Callable[[], Callable[[int, int], int] | None] = glibc_mallopt,
) -> str:
    """Set this process's allocator as train.freed_host_memory asks (before the model is built: blocks
    allocated earlier keep their kind); returns what was done, for the log."""
    wanted = resolve(policy, grad_sync, device)
    if wanted == KEEP:
        return f"freed host memory stays in glibc's heap for reuse (its default; train.freed_host_memory={policy})"
    variable = chosen_by_environment(environ)
    if variable is not None:
        return f"freed host memory is left as {variable} in the environment sets it (train.freed_host_memory={policy})"
    set_option = mallopt()
    if set_option is None or set_option(M_MMAP_THRESHOLD, RETURN_THRESHOLD_BYTES) != 1:
        log.warning(
            "train.freed_host_memory=%s: this C library has no glibc mallopt, so freed host memory stays wherever "
            "its allocator keeps it; set train.freed_host_memory=keep to silence this.",
            policy,
        )
        return "freed host memory: the C library's default (no glibc mallopt here)"
    return (
        "freed host memory returns to the OS at once: blocks of 128 KiB or more are unmapped when freed "
        f"(train.freed_host_memory={policy}; keep is faster and holds more memory)"
    )
