from pathlib import Path

from hpcml.localcluster.cluster import (
    LocalClusterLayout,
    clear_stale_step_dirs,
    paths_to_keep_visible,
    render_slurm_conf,
    render_slurmdbd_conf,
    slurmd_namespace_script,
)


def layout(tmp: str = "/work/repo/.cluster") -> LocalClusterLayout:
    return LocalClusterLayout(state_dir=Path(tmp), hostname="host")


def test_slurm_conf_has_two_logical_nodes_and_preemption():
    conf = render_slurm_conf(layout())
    assert "NodeName=n[1-2] NodeHostname=host NodeAddr=127.0.0.1 Port=[17001-17002]" in conf
    assert "SlurmdSpoolDir=/work/repo/.cluster/slurmd/%n" in conf
    assert "PreemptType=preempt/partition_prio" in conf
    assert "PartitionName=urgent" in conf and "PriorityTier=10" in conf
    assert "AccountingStorageType=accounting_storage/slurmdbd" in conf
    assert "AuthInfo=cred_expire=10" in conf
    assert "JobRequeue=1" in conf and "MaxArraySize=1001" in conf and "PreemptMode=REQUEUE GraceTime" in conf


def test_site_policies_can_be_switched():
    lay = LocalClusterLayout(
        state_dir=Path("/c"), hostname="h", job_requeue=False, batch_preempt_mode="CANCEL", max_array_size=5
    )
    conf = render_slurm_conf(lay)
    assert "JobRequeue=0" in conf and "MaxArraySize=5" in conf
    assert (
        "PartitionName=batch Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=CANCEL" in conf
    )


def test_slurmdbd_conf_points_at_the_private_mariadb():
    conf = render_slurmdbd_conf(layout())
    assert "StoragePort=16306" in conf and "StorageLoc=hpcml_slurm_acct" in conf


def test_node_namespace_gets_private_tmp_and_shm():
    script = slurmd_namespace_script(layout(), "n2")
    assert "mount --rbind '/var/tmp/hpcml-nodes/hpcml/n2/tmp' /tmp" in script
    assert "mount -t tmpfs -o size=1g tmpfs /dev/shm" in script
    assert script.rstrip().endswith("exec slurmd -N n2 -f '/work/repo/.cluster/etc/slurm.conf'")


def test_a_checkout_under_tmp_stays_visible_inside_the_node(monkeypatch):
    monkeypatch.chdir("/")
    lay = layout("/tmp/ci-check/.cluster")
    assert Path("/tmp/ci-check/.cluster") in paths_to_keep_visible(lay)
    script = slurmd_namespace_script(lay, "n1")
    keep = "mount --rbind '/tmp/ci-check/.cluster' '/var/tmp/hpcml-nodes/hpcml/n1/tmp/ci-check/.cluster'"
    assert keep in script
    # The keep-visible binds must come before /tmp is covered.
    assert script.index(keep) < script.index("/tmp' /tmp")


def test_only_the_outermost_path_under_tmp_is_bound(monkeypatch):
    import os

    os.makedirs("/tmp/ci-check/.cluster", exist_ok=True)
    monkeypatch.chdir("/tmp/ci-check")
    kept = paths_to_keep_visible(layout("/tmp/ci-check/.cluster"))
    assert Path("/tmp/ci-check") in kept and Path("/tmp/ci-check/.cluster") not in kept


def test_step_directories_left_by_an_earlier_cluster_are_cleared_and_nothing_else(tmp_path):
    """A new cluster numbers its jobs from 1 again: a killed step daemon's PMIx directory for job 19 made the
    next cluster's job 19 fail to launch its first step on that node, in every attempt (start_slurmd clears
    them first)."""
    (tmp_path / "spmix_appdir_0_19.0" / "pmix.x").mkdir(parents=True)
    (tmp_path / "pymp-abc").mkdir()
    (tmp_path / "ci-check").mkdir()
    assert clear_stale_step_dirs(tmp_path) == [tmp_path / "spmix_appdir_0_19.0"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ci-check", "pymp-abc"]
