import os
import sys
from pathlib import Path

import pytest

from hpcml.config import ClusterConfig, TrainConfig, TrainJobConfig
from hpcml.errors import SubmissionError
from hpcml.login import launch, slurm

GOLDEN = Path(__file__).parent / "golden"
LOCAL = ClusterConfig(name="local", submit=True, partition="batch", nodes=2, tasks_per_node=2, time_min=15)


@pytest.fixture
def two_partitions(monkeypatch):
    monkeypatch.setattr(
        slurm,
        "partitions",
        lambda: {"batch": slurm.Partition("batch", 2, True), "urgent": slurm.Partition("urgent", 2, False)},
    )


def test_unknown_partition_is_refused_with_the_choices(two_partitions):
    cfg = TrainJobConfig(cluster=ClusterConfig(submit=True, partition="gpu"))
    with pytest.raises(SubmissionError, match="cluster.partition=gpu does not exist.*batch, urgent"):
        launch.preflight(cfg)


def test_more_nodes_than_the_partition_has_is_refused(two_partitions):
    cfg = TrainJobConfig(cluster=ClusterConfig(submit=True, nodes=4))  # default partition: batch
    with pytest.raises(SubmissionError, match="partition batch has only 2 nodes"):
        launch.preflight(cfg)


def test_a_fitting_job_passes(two_partitions):
    launch.preflight(TrainJobConfig(cluster=LOCAL))


def test_partitions_parses_sinfo(monkeypatch):
    sinfo = "batch* 1 (null)\nbatch* 1 (null)\nurgent 2 (null)\ngpu 3 gpu:a100:4(S:0-1)\ngpu 1 gpu:2\n"
    monkeypatch.setattr(slurm, "run", lambda cmd: sinfo)
    found = slurm.partitions()
    assert found["batch"] == slurm.Partition("batch", 2, True, 0)
    assert found["urgent"] == slurm.Partition("urgent", 2, False, 0)
    assert found["gpu"] == slurm.Partition("gpu", 4, False, 4)


def test_more_gpus_per_node_than_the_partition_has_is_refused(monkeypatch):
    monkeypatch.setattr(slurm, "partitions", lambda: {"gpu": slurm.Partition("gpu", 4, True, 4)})
    launch.preflight(TrainJobConfig(cluster=ClusterConfig(submit=True, tasks_per_node=4, gpus_per_node=4)))
    too_many = ClusterConfig(submit=True, tasks_per_node=8, gpus_per_node=8)
    with pytest.raises(SubmissionError, match="cluster.gpus_per_node=8 but partition gpu has 4 GPUs per node"):
        launch.preflight(TrainJobConfig(cluster=too_many))
    monkeypatch.setattr(slurm, "partitions", lambda: {"cpu": slurm.Partition("cpu", 4, True, 0)})
    with pytest.raises(SubmissionError, match="partition cpu has no GPUs"):
        launch.preflight(TrainJobConfig(cluster=ClusterConfig(submit=True, tasks_per_node=4, gpus_per_node=4)))


def test_network_interface_and_nccl_debug_reach_every_rank_and_cluster_env_wins(tmp_path):
    cluster = ClusterConfig(submit=True, network_interface="ib0", gpus_per_node=1, env={"NCCL_DEBUG": "INFO"})
    text = render(cluster, tmp_path)
    assert "export NCCL_SOCKET_IFNAME=ib0\nexport GLOO_SOCKET_IFNAME=ib0\nexport NCCL_DEBUG=INFO\n" in text
    assert "NCCL_DEBUG" not in render(ClusterConfig(submit=True), tmp_path)  # a CPU job: no NCCL


def test_missing_slurm_client_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(SubmissionError, match="no Slurm client"):
        slurm.partitions()


def render(cluster: ClusterConfig, folder: Path) -> str:
    text = launch.render_sbatch(TrainJobConfig(cluster=cluster, train=TrainConfig(output_dir=str(folder))), folder)
    text = text.replace(str(launch.BATCH_SHELL), "<BATCH_SHELL>")
    return text.replace(str(folder), "<FOLDER>").replace(sys.executable, "<PYTHON>")


@pytest.mark.parametrize(
    "name, cluster",
    [
        ("local", LOCAL),
        (
            "site_gpu",
            ClusterConfig(
                name="site",
                submit=True,
                partition="gpu",
                account="proj",
                qos="high",
                constraint="a100",
                nodes=4,
                tasks_per_node=4,
                gpus_per_node=4,
                cpus_per_task=8,
                mem_gb=200,
                time_min=240,
                setup=["module load openmpi"],
                env={"OMP_NUM_THREADS": "8", "NOTE": "it's $HOME; rm -rf /"},
            ),
        ),
        # Elastic: --nodes=1-2, each node's CPUs reserved by --mincpus, the ranks per node given to srun.
        (
            "site_gpu_elastic",
            ClusterConfig(
                name="site", submit=True, nodes=2, min_nodes=1, tasks_per_node=4, gpus_per_node=4, cpus_per_task=8
            ),
        ),
    ],
)
def test_rendered_sbatch_matches_golden(name, cluster, tmp_path):
    """Regenerate with HPCML_UPDATE_GOLDEN=1 after an intended change, and review the diff."""
    text = render(cluster, tmp_path)
    golden = GOLDEN / f"{name}.sbatch"
    if os.environ.get("HPCML_UPDATE_GOLDEN"):
        golden.write_text(text)
        pytest.skip(f"rewrote {golden.name}: review its diff (a rewritten file cannot also be compared with itself)")
    assert text == golden.read_text()


def test_env_values_cannot_inject_shell(tmp_path):
    cluster = ClusterConfig(submit=True, env={"X": "a; touch /tmp/pwned"})
    assert "export X='a; touch /tmp/pwned'" in render(cluster, tmp_path)


def test_signal_lead_0_renders_no_warning_signal_at_all(tmp_path):
    """Slurm has no "off" value for --signal, so the line itself must go; the default keeps it."""
    from hpcml.config import PreemptConfig

    def rendered(preempt: PreemptConfig) -> str:
        cfg = TrainJobConfig(cluster=LOCAL, train=TrainConfig(output_dir=str(tmp_path)), preempt=preempt)
        return launch.render_sbatch(cfg, tmp_path)

    assert "#SBATCH --signal=USR2@120\n" in rendered(PreemptConfig())
    without = rendered(PreemptConfig(signal_lead_s=0))
    assert "--signal" not in without and "#SBATCH --requeue" in without


def test_sweep_array_script_matches_golden(two_partitions, tmp_path):
    from hpcml.login import sweep as sw

    configs = [TrainJobConfig(cluster=LOCAL, train=TrainConfig(output_dir=str(tmp_path / str(i)))) for i in range(3)]
    configs[0].launch.array_parallelism = 2
    trials = [sw.Trial(i, [f"optim.lr={i}"], str(i)) for i in range(3)]
    scripts = sw.submit_trials(sw.open_sweep(tmp_path, trials), trials, configs, dry_run=True)
    assert len(scripts) == 1
    text = scripts[0].replace(str(launch.BATCH_SHELL), "<BATCH_SHELL>").replace(str(tmp_path), "<SWEEP>")
    text = text.replace(sys.executable, "<PYTHON>")
    golden = GOLDEN / "local_array.sbatch"
    if os.environ.get("HPCML_UPDATE_GOLDEN"):
        golden.write_text(text)
        pytest.skip(f"rewrote {golden.name}: review its diff (a rewritten file cannot also be compared with itself)")
    assert text == golden.read_text()
    assert "#SBATCH --array=0-2%2" in text


def test_waiting_for_a_job_prints_each_new_state_and_returns_its_result(tmp_path, monkeypatch, capsys):
    from hpcml.login import polling

    states = iter(["UNKNOWN", "PENDING", "PENDING", "UNKNOWN", "RUNNING", "COMPLETED"])

    class Watcher:
        state = None

        def get_state(self, job_id, mode):
            self.state = next(states)
            return self.state

        def is_done(self, job_id, mode):
            return self.state == "COMPLETED"

    class Job:
        job_id = "42"
        watcher = Watcher()
        paths = type("Paths", (), {"stderr": tmp_path / "42_0_log.err"})

        def results(self):
            return [None]

    (tmp_path / "result.json").write_text('{"steps": 3}')
    monkeypatch.setattr(polling.time, "sleep", lambda s: None)
    assert launch.wait_for(Job(), tmp_path, poll_s=1.0) == {"steps": 3}
    printed = capsys.readouterr().out.splitlines()
    assert printed == ["job 42: submitted", "job 42: PENDING", "job 42: RUNNING", "job 42: COMPLETED"]
