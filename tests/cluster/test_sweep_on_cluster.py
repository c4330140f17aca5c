"""A real sweep on the local cluster: one array, a prompt return, status, a failure, resume, report."""

import json
import re
import subprocess
import time

from helpers import PYTHON, ROOT, TRAIN, mpi_env, site_policy

from hpcml.login.sweep import TERMINAL_STATES, load_sweep, sweep_status


def hpcml(*args):
    return subprocess.run(
        [PYTHON, "-m", "hpcml.login.cli", *args], cwd=ROOT, env=mpi_env(), capture_output=True, text=True, timeout=120
    )


def test_six_trial_sweep_end_to_end():
    base = ROOT / "outputs" / "test-runs" / f"sweep-{time.time_ns()}"
    sentinel = base.parent / f"{base.name}-fail-64-0.1"
    sentinel.parent.mkdir(parents=True, exist_ok=True)
    sentinel.touch()
    started = time.monotonic()
    done = subprocess.run(
        [
            PYTHON,
            TRAIN,
            "-m",
            "cluster=local",
            "optim.lr=0.02,0.1",
            "model.width=32,64,128",
            "train.steps=100",
            # One rank per trial (multi-rank runs are proved elsewhere), two CPUs each: four trials fit on the
            # cluster's eight CPUs at once, so two of the six must wait in the queue.
            "cluster.nodes=1",
            "cluster.tasks_per_node=1",
            "cluster.cpus_per_task=2",
            f"fault.raise_if_file_exists={base.parent}/{base.name}-fail-${{model.width}}-${{optim.lr}}",
            f"hydra.sweep.dir={base}",
        ],
        cwd=ROOT,
        env=mpi_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    submit_s = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    arrays = re.findall(r"submitted 6 trials as Slurm array (\d+)", done.stdout)
    assert len(arrays) == 1, done.stdout  # every trial in one array
    assert f"hpcml status {base} --watch" in done.stdout
    sweep = load_sweep(base)
    assert {t.job_id for t in sweep.trials} == {f"{arrays[0]}_{i}" for i in range(6)}
    # It returned while trials were still queued or running.
    first = sweep_status(sweep)
    assert any(r.state not in TERMINAL_STATES for r in first), (submit_s, first)
    assert oct((base / "slurm").stat().st_mode & 0o777) == "0o700"

    seen: dict[int, list[str]] = {}
    deadline = time.monotonic() + 400
    while True:
        rows = sweep_status(sweep)
        for r in rows:
            if not seen.get(r.num) or seen[r.num][-1] != r.state:
                seen.setdefault(r.num, []).append(r.state)
        if all(r.state in TERMINAL_STATES for r in rows):
            break
        assert time.monotonic() < deadline, rows
        time.sleep(1)
    assert all(s[-1] == "COMPLETED" for n, s in seen.items() if n != 4), seen
    assert seen[4][-1] == "FAILED"
    assert sum("PENDING" in s for s in seen.values()) >= 2 and all("RUNNING" in s for s in seen.values()), seen

    status = hpcml("status", str(base))
    assert status.returncode == 0
    failed_row = next(line for line in status.stdout.splitlines() if line.startswith("4 "))
    assert "optim.lr=0.1 model.width=64" in failed_row and "FAILED" in failed_row
    assert "RuntimeError: injected fault" in failed_row
    assert "6 trials: 5 completed, 1 failed" in status.stdout

    # Fix the cause, resume: only trial 4 is resubmitted; finished ones are untouched.
    before = {t.num: t.job_id for t in load_sweep(base).trials}
    untouched = (base / "0" / "result.json").stat().st_mtime
    sentinel.unlink()
    resumed = hpcml("resume", str(base))
    assert resumed.returncode == 0 and "resubmitted 1 trials: 4" in resumed.stdout, resumed.stdout + resumed.stderr
    after = load_sweep(base)
    assert {t.num for t in after.trials if t.job_id != before[t.num]} == {4}
    assert after.trials[4].previous_job_ids == [before[4]]
    deadline = time.monotonic() + 200
    while sweep_status(after)[4].state not in TERMINAL_STATES:
        assert time.monotonic() < deadline
        time.sleep(1)
    assert sweep_status(after)[4].state == "COMPLETED"
    assert (base / "0" / "result.json").stat().st_mtime == untouched
    assert "nothing to resume" in hpcml("resume", str(base)).stdout

    # The report's best is the trial that really had the best accuracy.
    accuracy = {
        n: json.loads((base / str(n) / "result.json").read_text())["metrics"]["test_accuracy"] for n in range(6)
    }
    report = hpcml("report", str(base), "--mode", "max")  # the sweep's objective: test_accuracy
    assert report.returncode == 0, report.stderr
    best = max(accuracy, key=accuracy.get)
    assert f"best: trial {best} " in report.stdout
    for name in ("summary.csv", "summary.md", "curves_loss.png", "final_test_accuracy_vs_model.width.png"):
        assert (base / "report" / name).is_file()
    # Each trial directory holds its resolved config, overrides and Slurm record (written by rank 0).
    record = json.loads((base / "4" / "slurm_job.json").read_text())
    assert record["job_id"] == after.trials[4].job_id
    assert (base / "4" / "overrides.yaml").is_file() and (base / "4" / "config.yaml").is_file()


def run_sweep(base, *overrides) -> subprocess.CompletedProcess:
    cmd = [PYTHON, TRAIN, "-m", "cluster=local", f"hydra.sweep.dir={base}", *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=mpi_env(), capture_output=True, text=True, timeout=120)


def wait_until_all_ended(sweep, timeout=300):
    deadline = time.monotonic() + timeout
    while True:
        rows = sweep_status(sweep)
        if all(r.state in TERMINAL_STATES for r in rows):
            return rows
        assert time.monotonic() < deadline, rows
        time.sleep(1)


def test_a_sweep_is_split_below_the_clusters_max_array_size():
    """With MaxArraySize=3 (indices 0-2), five trials go out as arrays of at most 2, and all of them run."""
    from hpcml.login import slurm

    base = ROOT / "outputs" / "test-runs" / f"sweep-maxarray-{time.time_ns()}"
    with site_policy("--max-array-size", "3"):
        assert slurm.max_array_size() == 3  # parsed from the real `scontrol show config`
        done = run_sweep(base, "train.seed=0,1,2,3,4", "train.steps=5", "cluster.nodes=1", "cluster.tasks_per_node=1")
    assert done.returncode == 0, done.stderr
    arrays = re.findall(r"submitted (\d) trials as Slurm array (\d+)", done.stdout)
    assert sorted(int(n) for n, _ in arrays) == [1, 2, 2], done.stdout
    rows = wait_until_all_ended(load_sweep(base))
    assert [r.state for r in rows] == ["COMPLETED"] * 5, rows
