"""What a rank's failure tells the batch shell: a peer that vanished, or the job's own error."""

import os
import signal
import threading
import time

import pytest
import torch.distributed as dist

from hpcml.compute.runtime import lost_a_peer


def _raised(exc: BaseException, cause: BaseException | None = None) -> BaseException:
    try:
        raise exc from cause
    except BaseException as caught:
        return caught


@pytest.mark.parametrize(
    "exc",
    [
        dist.DistNetworkError("store connection lost"),
        RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:29321"),
        _raised(
            RuntimeError("the collective in step 12 failed"), RuntimeError("[pair.cc:553] Connection closed by peer")
        ),
        dist.DistBackendError("NCCL error: remote process exited or there was a network error, NCCL version 2.21"),
        RuntimeError("[/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:32385: Connection reset by peer."),
    ],
)
def test_a_vanished_peer_is_recognised_through_the_exception_chain(exc):
    assert lost_a_peer(exc)


@pytest.mark.parametrize(
    "exc",
    [
        ValueError("bad batch"),
        RuntimeError("CUDA out of memory"),
        KeyError("w"),
        BrokenPipeError("[Errno 32] Broken pipe"),
    ],
)
def test_the_jobs_own_errors_are_not_a_lost_peer(exc):
    assert not lost_a_peer(exc)


@pytest.mark.parametrize("lost_peer", [True, False])
def test_a_rank_that_lost_a_peer_lets_the_launcher_report_it_before_aborting(monkeypatch, lost_peer):
    """The launcher reports only the first rank to end; the batch shell migrates on a report of ranks killed
    on a node. A survivor aborting at once can be reported first (seen in CI), so it waits; the job's own
    error is marked as such and aborts at once."""
    from hpcml.compute import runtime

    events: list[str] = []
    monkeypatch.setattr(runtime, "wait_for_the_launcher", lambda s, heard: events.append(f"wait {s:g}"))
    monkeypatch.setattr(runtime.mpi, "abort_if_running", lambda code: events.append(f"abort {code}"))
    monkeypatch.setattr(runtime.step_record, "mark_user_error", lambda: events.append("user error"))
    exc = RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer") if lost_peer else KeyError("w")
    runtime.end_all_ranks(2, exc)
    grace = f"wait {runtime.PEER_LOSS_GRACE_S:g}"
    assert events == ([grace, "abort 1"] if lost_peer else ["user error", "abort 1"])


def test_the_wait_for_the_launcher_ends_at_its_term_or_one_heard_before():
    from hpcml.compute import runtime

    before = signal.getsignal(signal.SIGTERM)
    threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()
    started = time.monotonic()
    runtime.wait_for_the_launcher(20)
    assert time.monotonic() - started < 5
    assert signal.getsignal(signal.SIGTERM) is before
    started = time.monotonic()
    runtime.wait_for_the_launcher(20, term_heard=lambda: True)  # the launcher's TERM came already
    assert time.monotonic() - started < 1
    started = time.monotonic()
    runtime.wait_for_the_launcher(0.2)  # no TERM: the whole wait
    assert time.monotonic() - started >= 0.2


@pytest.mark.parametrize(
    "signal_during_start_up, recorded_after_the_guard, heard",
    [(None, [], False), (signal.SIGUSR2, [], False), (signal.SIGTERM, [], True), (None, [signal.SIGTERM], True)],
)
def test_run_training_tells_the_wait_of_a_term_heard_before_the_error(
    monkeypatch, tmp_path, signal_during_start_up, recorded_after_the_guard, heard
):
    """A TERM the guard heard, or the early-signal recorder that handles TERM once the guard is gone, means the
    launcher is ending the step; a USR2 (the time-limit warning, which srun passes to the ranks) does not."""
    from types import SimpleNamespace

    from hpcml.compute import early_signals, runtime
    from hpcml.config import TrainJobConfig

    def setup_fails(*args):
        if signal_during_start_up is not None:
            os.kill(os.getpid(), signal_during_start_up)
            time.sleep(0.05)
        raise RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer")

    waited: list[bool] = []
    placement = SimpleNamespace(rank=0)
    monkeypatch.setattr(runtime, "detect_environment", lambda: SimpleNamespace(placement=lambda: placement))
    monkeypatch.setattr(runtime, "configure_logging", lambda rank, output_dir: None)
    monkeypatch.setattr(runtime, "setup_distributed", setup_fails)
    monkeypatch.setattr(runtime, "wait_for_the_launcher", lambda s, term_heard: waited.append(term_heard()))
    monkeypatch.setattr(runtime.mpi, "abort_if_running", lambda code: None)
    monkeypatch.setattr(early_signals, "SEEN", list(recorded_after_the_guard))
    cfg = TrainJobConfig()
    cfg.train.output_dir = str(tmp_path)
    with pytest.raises(RuntimeError, match="Connection closed by peer"):
        runtime.run_training(cfg)
    assert waited == [heard]
