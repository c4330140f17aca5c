"""Submitting, following and interrupting training jobs on the local cluster: shared by the cluster tests."""

import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from helpers import PYTHON, ROOT, TRAIN, attempts, last_logged_step, mpi_env

# Independent runs are compared bitwise, so they must sum gradients in the same order: transport=auto
# probes per run (a resumed run reuses its checkpoint's plan, so resume itself is exact either way).
SAME_TRANSPORT = "train.transport=torch"


def submit(out_dir, *overrides, wait=True):
    cmd = [
        PYTHON,
        TRAIN,
        "cluster=local",
        f"launch.wait={str(wait).lower()}",
        "launch.poll_s=1",
        f"train.output_dir={out_dir}",
        f"hydra.run.dir={out_dir}",
        SAME_TRANSPORT,
        *overrides,
    ]
    return subprocess.Popen(cmd, cwd=ROOT, env=mpi_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def job_id_of(out_dir, timeout=60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        logs = list((out_dir / "slurm").glob("*_submitted.pkl")) if (out_dir / "slurm").exists() else []
        if logs:
            return logs[0].name.split("_")[0]
        time.sleep(0.5)
    raise AssertionError("no job was submitted")


def wait_for_step(out_dir, step, timeout=120):
    deadline = time.monotonic() + timeout
    while last_logged_step(out_dir) < step:
        assert time.monotonic() < deadline, f"training never reached step {step}"
        time.sleep(0.3)


def rank0_log(out, job) -> str:
    return (out / "slurm" / f"{job}_0_log.err").read_text()


def wait_for_log(out, job, text, timeout=180):
    """Until rank 0's log (every attempt's) says `text`."""
    deadline = time.monotonic() + timeout
    while not (out / "slurm" / f"{job}_0_log.err").exists() or text not in rank0_log(out, job):
        assert time.monotonic() < deadline, f"rank 0 never logged {text!r}: {attempts(job)}"
        time.sleep(0.2)


def wait_until_resumed(out, job, times, timeout=180):
    """Until the restart after the `times`-th interrupt has resumed training. (Its Slurm state alone, RUNNING,
    is not enough before the next interrupt: a TERM to ranks that are still starting Python kills them before
    any code of ours runs, and the batch shell then relaunches the step in the same allocation, measured.)"""
    deadline = time.monotonic() + timeout
    while not (out / "slurm" / f"{job}_0_log.err").exists() or rank0_log(out, job).count("resumed from") < times:
        assert time.monotonic() < deadline, f"no resume after interrupt {times}: {attempts(job)}"
        time.sleep(0.5)


def finish(proc, timeout=420):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"{out}\n{err}"
    return out


def new_out(name):
    return ROOT / "outputs" / "test-runs" / f"{name}-{time.time_ns()}"


def interrupt(kind: str, job_id: str) -> None:
    if kind == "scontrol_requeue":
        subprocess.run(["scontrol", "requeue", job_id], check=True)
    elif kind == "scancel_term":
        # What the ranks of an srun job get when a preemption starts, or from a user.
        subprocess.run(["scancel", "--signal=TERM", job_id], check=True)
    elif kind == "preemption":
        # A job in the high-priority partition that needs every CPU: Slurm preempts ours to run it.
        subprocess.run(
            ["sbatch", "-p", "urgent", "-N2", "--ntasks-per-node=4", "-o", "/dev/null", "--wrap", "sleep 2"],
            check=True,
            capture_output=True,
        )
    else:
        raise ValueError(kind)


def together(**checks: Callable[[], None]) -> None:
    """Runs independent cluster checks at the same time (each job takes half the cluster's CPUs, and most of
    their time is Slurm's start-up and requeue delays); every check's failure is raised, named."""
    with ThreadPoolExecutor(len(checks)) as pool:
        running = {name: pool.submit(check) for name, check in checks.items()}
    failures = [(name, future.exception()) for name, future in running.items() if future.exception()]
    for name, error in failures[1:]:
        print(f"{name} failed too: {error!r}")
    if failures:
        name, error = failures[0]
        raise AssertionError(f"{name}: {error}") from error
