"""The main job, end to end on the real local cluster: Hydra -> submitit -> sbatch -> srun/PMIx -> MPI."""

import re
import subprocess
import time
from pathlib import Path

import pytest
from cluster_jobs import together
from helpers import PYTHON, ROOT, TRAIN, mpi_env, node_states, read_result, sacct_state

# A real run of the default config (300 steps, 2 nodes x 2 ranks) reached 0.96; 0.93 leaves room for
# nothing but a real regression.
ACCURACY_BAR = 0.93


def submit_and_wait(out_dir, *overrides, timeout=300):
    cmd = [
        PYTHON,
        TRAIN,
        "cluster=local",
        "launch.wait=true",
        "launch.poll_s=1",
        f"train.output_dir={out_dir}",
        f"hydra.run.dir={out_dir}",
        *overrides,
    ]
    return subprocess.run(cmd, cwd=ROOT, env=mpi_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def demo_run():
    """`make demo`, exactly as the README tells a newcomer to run it."""
    done = subprocess.run(["make", "-s", "demo"], cwd=ROOT, env=mpi_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    out_dir = Path(re.search(r"outputs: (\S+)", done.stdout).group(1))
    return out_dir, done


def test_two_nodes_two_ranks_train_to_the_bar(demo_run):
    out_dir, done = demo_run
    result = read_result(out_dir)
    assert result["world_size"] == 4 and result["num_nodes"] == 2
    assert result["launcher"] == "Slurm (srun)" and result["backend"] == "gloo"
    assert result["replicas_identical"] and len(set(result["rank_params_sha256"])) == 1
    assert result["metrics"]["test_accuracy"] >= ACCURACY_BAR
    assert "finished: 300 steps on 2 nodes x 2 ranks" in done.stdout


def test_ranks_really_ran_on_both_nodes_and_accounting_saw_it(demo_run):
    out_dir, done = demo_run
    job_id = re.search(r"submitted Slurm job (\d+)", done.stdout).group(1)
    logs = "".join(p.read_text() for p in (out_dir / "slurm").glob(f"{job_id}_*_log.err"))
    for rank, node in ((0, 0), (1, 0), (2, 1), (3, 1)):
        assert f"rank {rank}/4 on node {node}/2" in logs
    assert sacct_state(job_id) == "COMPLETED"
    # Metrics from rank 0 only: one line per logged step plus the final accuracy.
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 300 // 10 + 1
    assert list((out_dir / "tensorboard").glob("events.out.tfevents.*"))


def test_a_failing_rank_ends_its_job_promptly_while_the_example_project_trains_beside_it():
    """Two jobs at once, each on 2 of every node's 4 CPUs: the two checks below."""
    together(
        one_failing_rank=one_failing_rank_ends_the_job_promptly_and_leaves_nodes_healthy,
        example_project=the_example_project_trains_on_the_cluster_with_no_change_to_hpcml,
    )


def one_failing_rank_ends_the_job_promptly_and_leaves_nodes_healthy():
    """Rank 3 raises at step 5: the job ends FAILED within the README's bound, with rank 3's traceback in its
    log, and no node is left drained or down."""
    out_dir = ROOT / "outputs" / "test-runs" / f"fail-{time.time_ns()}"
    started = time.monotonic()
    done = submit_and_wait(out_dir, "train.steps=1000000", "fault.raise_at_step=5", "fault.rank=3")
    elapsed = time.monotonic() - started
    assert done.returncode == 2
    assert "failed" in done.stderr
    job_id = re.search(r"submitted Slurm job (\d+)", done.stdout).group(1)
    rank3_log = (out_dir / "slurm" / f"{job_id}_3_log.err").read_text()
    assert "RuntimeError: injected fault on rank 3 at step 5" in rank3_log
    # Documented bound (README): a failing rank ends the job within 60 s (here it takes seconds).
    assert elapsed < 90, f"the job took {elapsed:.0f}s to end after a rank failed"
    assert sacct_state(job_id) == "FAILED"
    time.sleep(2)
    assert all(not any(bad in s for bad in ("drain", "down", "fail")) for s in node_states().values()), node_states()


def the_example_project_trains_on_the_cluster_with_no_change_to_hpcml():
    """examples/own_model, as its README says to run it: its own package (a BatchNorm CNN, an augmenting
    Dataset) and config directory, from its own folder, with DataLoader workers, on 2 nodes x 2 ranks."""
    example = ROOT / "examples" / "own_model"
    out = ROOT / "outputs" / "test-runs" / f"example-{time.time_ns()}"  # every node sees it
    env = mpi_env()
    env["PYTHONPATH"] = ""  # found from the folder it runs in, as for a user, not from a path set for tests
    cmd = [PYTHON, TRAIN, "--config-dir", "conf", "model=small_cnn", "data=shifted_digits", "optim=adam"]
    cmd += ["cluster=local", "launch.wait=true", "launch.poll_s=1", "loader.num_workers=2", "train.steps=150"]
    cmd += [f"train.output_dir={out}", f"hydra.run.dir={out}"]
    done = subprocess.run(cmd, cwd=example, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    result = read_result(out)
    assert result["world_size"] == 4 and result["num_nodes"] == 2 and result["replicas_identical"]
    assert result["metrics"]["test_accuracy"] >= 0.8, result["metrics"]
    assert "test_accuracy" in done.stdout  # the finished line names the task's metrics
