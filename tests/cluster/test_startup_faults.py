"""Start-up crashes on the real local cluster: a step that dies before its ranks formed their world, for a
reason outside the job's config or code, is relaunched, counted and shown (the check below, which
test_fault_tolerance.py runs beside the requeue-cap job); a config error is not. The bound on relaunches is
driven in tests/test_batch_shell.py."""

import json
import subprocess
import time

import numpy as np
from helpers import PYTHON, ROOT, TRAIN, attempts, mpi_env, read_result


def run(out, *overrides, check=True):
    cmd = [PYTHON, TRAIN, "cluster=local", "launch.poll_s=1", f"train.output_dir={out}", f"hydra.run.dir={out}"]
    return subprocess.run([*cmd, *overrides], cwd=ROOT, env=mpi_env(), capture_output=True, text=True, timeout=300)


def job_of(out) -> str:
    return json.loads((out / "slurm_job.json").read_text())["job_id"]


def start_up_crash_is_relaunched_counted_and_shown(out_dir):
    """Rank 3's first launch crashes before the world forms: relaunched inside the allocation, counted and shown
    by `hpcml status`. Run beside the requeue-cap job (test_fault_tolerance.py): each job takes 2 of every
    node's 4 CPUs, and nothing preempts either."""
    done = run(out_dir, "launch.wait=true", "train.steps=20", "fault.crash_at_start_launches=1", "fault.rank=3")
    assert done.returncode == 0, done.stdout + done.stderr
    job = job_of(out_dir)
    assert attempts(job) == ["COMPLETED"]  # relaunched inside the allocation, not requeued
    assert read_result(out_dir)["replicas_identical"]
    assert json.loads((out_dir / "slurm_job.json").read_text())["startup_retries"] == 1
    log = (out_dir / "slurm" / f"{job}_0_log.err").read_text()
    assert "before its ranks formed their world, with no error from the job's config or code; relaunching it" in log
    assert "(start-up retry 1 of 2)" in log
    status = subprocess.run(
        [PYTHON, "-m", "hpcml.login.cli", "status", str(out_dir)], cwd=ROOT, capture_output=True, text=True
    )
    assert status.returncode == 0, status.stderr
    header, row = status.stdout.splitlines()[:2]
    assert row[header.index("retries") :].split()[0] == "1", status.stdout


def test_a_config_error_on_the_compute_node_fails_at_once(out_dir):
    data = out_dir / "arrays.npz"
    rng = np.random.default_rng(0)
    np.savez(data, x=rng.normal(size=(64, 4)).astype("float32"), y=rng.integers(0, 2, 64))
    done = run(out_dir, "data=npz", f"data.path={data}", "data.input_dim=4", "data.num_classes=2", "train.steps=20")
    assert done.returncode == 0, done.stderr
    data.unlink()  # valid on the login node, gone by the time the ranks check it
    job = next((out_dir / "slurm").glob("*_submitted.pkl")).name.split("_")[0]
    deadline = time.monotonic() + 120
    while attempts(job)[-1:] not in (["FAILED"], ["COMPLETED"]):
        assert time.monotonic() < deadline, attempts(job)
        time.sleep(1)
    assert attempts(job) == ["FAILED"]
    log = (out_dir / "slurm" / f"{job}_0_log.err").read_text()
    assert "does not exist" in log and "relaunching" not in log
