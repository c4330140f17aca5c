"""train.freed_host_memory: which policy each run gets, that the environment's own malloc settings win, that a
C library without mallopt only warns, and (in a fresh process, with glibc itself) that `return` really has
a freed block's size mapped afresh, and returned, where glibc's default would serve it from its heap."""

import logging
import subprocess
import sys

import pytest
import torch

from hpcml.compute import host_memory
from hpcml.compute.host_memory import KEEP, M_MMAP_THRESHOLD, RETURN, RETURN_THRESHOLD_BYTES
from hpcml.config import TrainConfig
from hpcml.errors import ConfigError

CPU, GPU = torch.device("cpu"), torch.device("cuda", 0)


@pytest.fixture(autouse=True)
def threshold_never_fixed(monkeypatch):
    """Each test starts as a process that has not fixed glibc's threshold (the fakes below fix nothing)."""
    monkeypatch.setattr(host_memory, "_fixed", False)


@pytest.mark.parametrize(
    ("policy", "grad_sync", "device", "resolved"),
    [
        ("auto", "fsdp", CPU, RETURN),  # sharding is meant to save the host memory the parameters live in
        ("auto", "ddp", CPU, KEEP),
        ("auto", "flat", CPU, KEEP),
        ("auto", "fsdp", GPU, KEEP),  # the parameters live on the GPU
        ("return", "ddp", GPU, RETURN),
        ("keep", "fsdp", CPU, KEEP),
    ],
)
def test_auto_returns_freed_memory_for_fsdp_on_cpus_only(policy, grad_sync, device, resolved):
    assert host_memory.resolve(policy, grad_sync, device) == resolved


class FakeMallopt:
    def __init__(self, answer: int = 1):
        self.calls: list[tuple[int, int]] = []
        self.answer = answer

    def __call__(self, option: int, value: int) -> int:
        self.calls.append((option, value))
        return self.answer


def test_return_fixes_glibcs_mmap_threshold_and_keep_leaves_it_alone():
    fake = FakeMallopt()
    said = host_memory.apply("auto", "ddp", CPU, environ={}, find_mallopt=lambda: fake)
    assert fake.calls == [] and said.startswith("freed host memory stays in glibc's heap")
    said = host_memory.apply("auto", "fsdp", CPU, environ={}, find_mallopt=lambda: fake)
    assert fake.calls == [(M_MMAP_THRESHOLD, RETURN_THRESHOLD_BYTES)]
    assert said.startswith("freed host memory returns to the OS at once") and "train.freed_host_memory=auto" in said


def test_a_later_run_in_the_same_process_is_told_the_threshold_stays_fixed():
    """glibc's dynamic threshold cannot be turned back on: a `keep` run after a `return` one in one process (a
    multirun without a launcher) must not claim glibc's default."""
    fake = FakeMallopt()
    host_memory.apply("return", "ddp", CPU, environ={}, find_mallopt=lambda: fake)
    said = host_memory.apply("keep", "ddp", CPU, environ={}, find_mallopt=lambda: fake)
    assert "as an earlier run in this process set it" in said and len(fake.calls) == 1


@pytest.mark.parametrize(
    "environ",
    [
        {"MALLOC_MMAP_THRESHOLD_": "65536"},
        {"MALLOC_TRIM_THRESHOLD_": "0"},
        {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"},
    ],
)
@pytest.mark.parametrize("policy", ["return", "keep"])
def test_the_environments_own_threshold_wins(environ, policy):
    fake = FakeMallopt()
    said = host_memory.apply(policy, "fsdp", CPU, environ=environ, find_mallopt=lambda: fake)
    assert fake.calls == []
    assert f"as {next(iter(environ))} in the environment sets it" in said


@pytest.mark.parametrize(
    "environ",
    [
        {"GLIBC_TUNABLES": "glibc.pthread.rseq=0"},
        {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"},
        {"MALLOC_ARENA_MAX": "2"},
    ],
)
def test_settings_that_leave_the_dynamic_threshold_on_leave_the_choice_to_hpcml(environ):
    fake = FakeMallopt()
    host_memory.apply("return", "fsdp", CPU, environ=environ, find_mallopt=lambda: fake)
    assert fake.calls == [(M_MMAP_THRESHOLD, RETURN_THRESHOLD_BYTES)]


@pytest.mark.parametrize("mallopt", [lambda: None, lambda: FakeMallopt(answer=0)], ids=["absent", "refused"])
def test_a_c_library_without_mallopt_only_warns(mallopt, caplog):
    with caplog.at_level(logging.WARNING, logger="hpcml.compute.host_memory"):
        said = host_memory.apply("return", "ddp", CPU, environ={}, find_mallopt=mallopt)
    assert "the C library's default" in said
    assert (
        "this C library has no glibc mallopt, or it refused" in caplog.text
        and "train.freed_host_memory=keep" in caplog.text
    )


def test_an_unknown_policy_is_refused_naming_the_choices():
    with pytest.raises(ConfigError, match=r"^train.freed_host_memory='lean' is not one of auto, return, keep"):
        TrainConfig(freed_host_memory="lean")


# glibc's own account of its mmapped bytes (mallinfo2's hblkhd) while a 1 MiB block is held, after one of that
# size was freed: under glibc's default the free raised its threshold and the heap serves the second block.
PROBE = """
import ctypes, sys, torch
from hpcml.compute import host_memory
class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Mallinfo2
host_memory.apply(sys.argv[1], "fsdp", torch.device("cpu"), environ={})
first = torch.empty(1 << 20, dtype=torch.uint8)
del first
before = libc.mallinfo2().hblkhd
second = torch.empty(1 << 20, dtype=torch.uint8)
held = libc.mallinfo2().hblkhd - before
del second
print(held, libc.mallinfo2().hblkhd - before)
"""


@pytest.mark.parametrize(("policy", "mapped"), [("return", True), ("keep", False)])
def test_with_glibc_a_freed_blocks_size_is_mapped_afresh_only_under_return(policy, mapped):
    import ctypes

    if not hasattr(ctypes.CDLL(None), "mallinfo2"):
        pytest.skip("glibc before 2.33 has no mallinfo2 to count its mapped bytes")
    done = subprocess.run([sys.executable, "-c", PROBE, policy], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    held, after_free = map(int, done.stdout.split())
    if mapped:
        assert held >= 1 << 20 and after_free == 0  # mapped for the block, and unmapped when it was freed
    else:
        assert held == 0  # served from the heap, which keeps it when freed
