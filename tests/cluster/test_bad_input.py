"""Bad input is refused before anything reaches Slurm, with an error that names the fix."""

import subprocess

import pytest
from helpers import PYTHON, ROOT, TRAIN, mpi_env


def job_count() -> int:
    return len(
        subprocess.run(
            ["sacct", "-X", "-n", "-P", "-o", "JobID", "-S", "now-1days"], capture_output=True, text=True
        ).stdout.split()
    )


@pytest.mark.parametrize(
    "overrides, status, message",
    [
        (
            ["cluster.partition=nope"],
            2,
            "cluster.partition=nope does not exist on this cluster; available: batch, urgent",
        ),
        (["cluster.nodes=4"], 2, "partition batch has only 2 nodes"),
        (["cluster.nodes=0"], 2, "cluster.nodes=0"),
        (
            ["data=npz", "data.path=/no/such/file.npz", "data.input_dim=4", "data.num_classes=2"],
            2,
            "data.train.path=/no/such/file.npz does not exist",
        ),
        (["model._target_=my_project.Net"], 2, "model._target_=my_project.Net: no such module"),
        (["+optim.momentun=0.5"], 2, "it takes no argument 'momentun' (did you mean 'momentum'?)"),
        (["train.stepz=5"], 1, "Key 'stepz' not in 'TrainConfig'"),
    ],
)
def test_refused_before_submission(overrides, status, message, tmp_path):
    before = job_count()
    done = subprocess.run(
        [PYTHON, TRAIN, "cluster=local", f"train.output_dir={tmp_path}", f"hydra.run.dir={tmp_path}", *overrides],
        cwd=ROOT,
        env=mpi_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == status, done.stderr
    assert message in done.stderr
    assert job_count() == before
    assert not (tmp_path / "slurm").exists()
