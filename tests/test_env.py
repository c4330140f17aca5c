import pytest

from hpcml.compute.env import (
    OpenMPIEnvironment,
    PMIEnvironment,
    ProcessPlacement,
    SingleProcessEnvironment,
    SlurmEnvironment,
    TorchrunEnvironment,
    detect_environment,
)
from hpcml.errors import EnvironmentDetectionError

SRUN = {
    "SLURM_STEP_ID": "0",
    "SLURM_PROCID": "3",
    "SLURM_NTASKS": "4",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1",
    "SLURM_NNODES": "2",
    "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
    "SLURMD_NODENAME": "n2",
}
MPIRUN = {
    "OMPI_COMM_WORLD_RANK": "2",
    "OMPI_COMM_WORLD_SIZE": "4",
    "OMPI_COMM_WORLD_LOCAL_RANK": "0",
    "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
}
TORCHRUN = {
    "TORCHELASTIC_RUN_ID": "abc",
    "RANK": "5",
    "WORLD_SIZE": "8",
    "LOCAL_RANK": "1",
    "LOCAL_WORLD_SIZE": "4",
    "GROUP_RANK": "1",
}
HYDRA = {"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"}


def test_srun_placement():
    env = detect_environment(SRUN)
    assert isinstance(env, SlurmEnvironment) and env.uses_mpi
    assert env.placement() == ProcessPlacement(3, 4, 1, 2, 1, 2)
    assert env.node_name() == "n2"


def test_mpirun_placement_derives_node_rank():
    env = detect_environment(MPIRUN)
    assert isinstance(env, OpenMPIEnvironment)
    assert env.placement() == ProcessPlacement(2, 4, 0, 2, 1, 2)


def test_torchrun_placement():
    env = detect_environment(TORCHRUN)
    assert isinstance(env, TorchrunEnvironment) and not env.uses_mpi
    assert env.placement() == ProcessPlacement(5, 8, 1, 4, 1, 2)


def test_pmi_placement():
    env = detect_environment(HYDRA)
    assert isinstance(env, PMIEnvironment)
    assert env.placement() == ProcessPlacement(1, 2, 1, 2, 0, 1)


def test_single_process_when_nothing_is_set():
    env = detect_environment({})
    assert isinstance(env, SingleProcessEnvironment)
    assert env.placement() == ProcessPlacement(0, 1, 0, 1, 0, 1)


def test_mpirun_inside_sbatch_beats_the_batch_steps_slurm_variables():
    # The batch shell's SLURM_* describe the batch step; the ranks are Open MPI's.
    env = detect_environment({**SRUN, **MPIRUN})
    assert isinstance(env, OpenMPIEnvironment)
    assert env.placement().rank == 2


def test_torchrun_under_srun_is_torchrun():
    assert isinstance(detect_environment({**SRUN, **TORCHRUN}), TorchrunEnvironment)


def test_batch_shell_without_a_step_is_not_srun():
    batch_shell = {k: v for k, v in SRUN.items() if k != "SLURM_STEP_ID"}
    assert isinstance(detect_environment(batch_shell), SingleProcessEnvironment)


def test_uneven_tasks_per_node():
    env = SlurmEnvironment({**SRUN, "SLURM_STEP_TASKS_PER_NODE": "3,1", "SLURM_PROCID": "3", "SLURM_LOCALID": "0"})
    assert env.placement().local_world_size == 1


@pytest.mark.parametrize(
    "environ, fragment",
    [
        ({**SRUN, "SLURM_PROCID": "three"}, "SLURM_PROCID='three' is not an integer"),
        ({**SRUN, "SLURM_PROCID": "-1"}, "negative"),
        ({**SRUN, "SLURM_PROCID": "4"}, "rank 4 is outside world size 4"),
        ({**SRUN, "SLURM_STEP_TASKS_PER_NODE": "2(x"}, "cannot parse tasks per node"),
        ({**MPIRUN, "OMPI_COMM_WORLD_LOCAL_RANK": "2"}, "local rank 2 is outside local size 2"),
        ({k: v for k, v in TORCHRUN.items() if k != "WORLD_SIZE"}, "RANK and WORLD_SIZE must both be set"),
    ],
)
def test_malformed_variables_are_named(environ, fragment):
    with pytest.raises(EnvironmentDetectionError, match=fragment.replace("(", r"\(")):
        detect_environment(environ).placement()


def test_error_lists_what_was_tried_when_single_process_is_not_allowed():
    with pytest.raises(EnvironmentDetectionError) as err:
        detect_environment({}, allow_single=False)
    for name in ("torchrun", "Open MPI", "PMI", "Slurm"):
        assert name in str(err.value)
