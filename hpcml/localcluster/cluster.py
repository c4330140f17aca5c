"""The embedded two-node Slurm cluster: `make cluster-up`, `cluster-down`, `cluster-status`.

It runs the real Debian daemons (munge, MariaDB, slurmdbd, slurmctld, two slurmd) on this machine with
all state under one directory, so `make demo` and the end-to-end tests meet Slurm as users do. Each
slurmd lives in its own mount namespace with a private /tmp and /dev/shm, because that is what makes
`srun --mpi=pmix` work across two logical nodes on one host (../shared/CLUSTER.md) and it keeps /tmp
node-local exactly as on a real cluster.

On a machine that already runs Slurm (a login node) this module refuses to touch anything: the same
commands then submit to the site's cluster through `cluster=<site>`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

MARKER = "# managed by hpcml.localcluster"
SYSTEM_SLURM_CONF = Path("/etc/slurm/slurm.conf")
APT_PACKAGES = [
    "slurm-wlm",
    "slurmdbd",
    "munge",
    "mariadb-server",
    "openmpi-bin",
    "libopenmpi-dev",
]  # as the Makefile's deps


class LocalClusterError(RuntimeError):
    """The local cluster could not be brought up or down; the message says what to do."""


@dataclass(frozen=True)
class LocalClusterLayout:
    """Where everything lives and which ports it uses; one value describes the whole cluster."""

    state_dir: Path
    cluster_name: str = "hpcml"
    nodes: tuple[str, ...] = ("n1", "n2")
    # More CPUs than the 2 real cores: lets 2 ranks x 2 jobs share a node (SlurmdParameters=config_overrides).
    cpus_per_node: int = 4
    memory_mb_per_node: int = 4000
    slurmctld_port: int = 16817
    slurmdbd_port: int = 16819
    mariadb_port: int = 16306
    first_slurmd_port: int = 17001
    db_name: str = "hpcml_slurm_acct"
    db_user: str = "slurm"
    db_password: str = "hpcml-local"
    # A database for Optuna studies whose storage is a URL (hydra.sweeper.storage): optuna_storage_url.
    optuna_db_name: str = "hpcml_optuna"
    # Requeued jobs wait cred_expire+1 s before they may start again; 10 s keeps resume tests short.
    cred_expire_s: int = 10
    # Preemption grace: how long a low-priority job has between SIGTERM and the kill.
    preempt_grace_s: int = 20
    # Site policies a job must cope with, switchable for tests (`up --job-requeue 0` and so on):
    # JobRequeue=0 makes jobs not requeueable unless they ask (sbatch --requeue); CANCEL ends a preempted
    # batch job instead of requeueing it; MaxArraySize caps the indices of one job array.
    job_requeue: bool = True
    batch_preempt_mode: str = "REQUEUE"
    max_array_size: int = 1001
    hostname: str = field(default_factory=lambda: socket.gethostname().split(".")[0])

    @property
    def etc(self) -> Path:
        return self.state_dir / "etc"

    @property
    def log(self) -> Path:
        return self.state_dir / "log"

    @property
    def run(self) -> Path:
        return self.state_dir / "run"

    @property
    def slurm_conf(self) -> Path:
        return self.etc / "slurm.conf"

    @property
    def slurmdbd_conf(self) -> Path:
        return self.etc / "slurmdbd.conf"

    @property
    def optuna_storage_url(self) -> str:
        """For hydra.sweeper.storage: a study kept in this cluster's MariaDB (needs pymysql)."""
        return f"mysql+pymysql://{self.db_user}:{self.db_password}@127.0.0.1:{self.mariadb_port}/{self.optuna_db_name}"

    @property
    def mariadb_dir(self) -> Path:
        return self.state_dir / "mariadb"

    def node_tmp(self, node: str) -> Path:
        # Outside /tmp on purpose: the node's /tmp is bind-mounted from here.
        return Path("/var/tmp/hpcml-nodes") / self.cluster_name / node

    def pid_file(self, daemon: str) -> Path:
        return self.run / f"{daemon}.pid"


# ---------------------------------------------------------------- rendering the configs


def render_slurm_conf(layout: LocalClusterLayout) -> str:
    s = layout.state_dir
    last_port = layout.first_slurmd_port + len(layout.nodes) - 1
    first, last = layout.nodes[0], layout.nodes[-1]
    node_range = f"{first[:-1]}[{first[-1]}-{last[-1]}]" if len(layout.nodes) > 1 else first
    return f"""{MARKER} (state in {s})
ClusterName={layout.cluster_name}
SlurmctldHost={layout.hostname}(127.0.0.1)
SlurmctldPort={layout.slurmctld_port}
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire={layout.cred_expire_s}
StateSaveLocation={s}/slurmctld
SlurmctldPidFile={layout.pid_file("slurmctld")}
SlurmctldLogFile={layout.log}/slurmctld.log
SlurmdSpoolDir={s}/slurmd/%n
SlurmdPidFile={layout.run}/slurmd-%n.pid
SlurmdLogFile={layout.log}/slurmd-%n.log
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# Schedule every few seconds (defaults: 60 s main loop, 30 s backfill): a requeued job restarts promptly.
SchedulerParameters=sched_interval=2,bf_interval=5
# Keep the reason hpcml records when it gives up (requeue cap) where `sacct -o Comment` shows it.
AccountingStoreFlags=job_comment
ReturnToService=2
JobRequeue={int(layout.job_requeue)}
MaxArraySize={layout.max_array_size}
# Partition-priority preemption, as many sites run it: a job in 'urgent' requeues jobs in 'batch'.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort={layout.slurmdbd_port}
JobAcctGatherType=jobacct_gather/linux
JobCompType=jobcomp/none
NodeName={node_range} NodeHostname={layout.hostname} NodeAddr=127.0.0.1 Port=[{layout.first_slurmd_port}-{last_port}] CPUs={layout.cpus_per_node} RealMemory={layout.memory_mb_per_node} State=UNKNOWN
PartitionName=batch Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode={layout.batch_preempt_mode} GraceTime={layout.preempt_grace_s}
PartitionName=urgent Nodes=ALL Default=NO MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
"""


def render_slurmdbd_conf(layout: LocalClusterLayout) -> str:
    return f"""{MARKER}
AuthType=auth/munge
DbdHost=localhost
DbdPort={layout.slurmdbd_port}
SlurmUser=root
PidFile={layout.pid_file("slurmdbd")}
LogFile={layout.log}/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={layout.mariadb_port}
StorageUser={layout.db_user}
StoragePass={layout.db_password}
StorageLoc={layout.db_name}
"""


# ---------------------------------------------------------------- small side-effect seams


def _run(cmd: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, text=True, capture_output=True, **kw)
    if check and done.returncode != 0:
        raise LocalClusterError(f"`{' '.join(cmd)}` failed with status {done.returncode}: {done.stderr.strip()}")
    return done


def _pid_alive(pid_file: Path) -> int | None:
    try:
        pid = int(pid_file.read_text().split()[0])
        os.kill(pid, 0)
    except (OSError, ValueError, IndexError):
        return None
    return pid


def _wait_for(what: str, probe, timeout_s: float, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if probe():
            return
        time.sleep(0.5)
    tail = ""
    if log and log.exists():
        tail = "\n  last log lines:\n    " + "\n    ".join(log.read_text().splitlines()[-8:])
    raise LocalClusterError(f"{what} did not come up within {timeout_s:.0f}s.{tail}")


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _refuse_taken_port(port: int, daemon: str) -> None:
    if _port_open(port):
        owner = SYSTEM_SLURM_CONF.resolve() if SYSTEM_SLURM_CONF.is_symlink() else "another program"
        raise LocalClusterError(
            f"port {port} for {daemon} is taken, but not by this cluster's {daemon}; a cluster started from "
            f"another checkout ({owner}) is probably running. Stop it there with `make cluster-down`."
        )


def _slurm_env(layout: LocalClusterLayout) -> dict[str, str]:
    return {**os.environ, "SLURM_CONF": str(layout.slurm_conf)}


# ---------------------------------------------------------------- the daemons


def ensure_packages() -> None:
    missing = [b for b in ("slurmctld", "slurmd", "slurmdbd", "munged", "mariadbd", "mpirun") if not shutil.which(b)]
    if not missing:
        return
    if os.geteuid() != 0:
        raise LocalClusterError(
            f"missing programs {missing}; install as root: apt-get install -y {' '.join(APT_PACKAGES)}"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-q", *APT_PACKAGES], check=True, env=env)


def start_munge() -> None:
    def works() -> bool:
        enc = subprocess.run(["munge", "-n"], capture_output=True)
        return (
            enc.returncode == 0 and subprocess.run(["unmunge"], input=enc.stdout, capture_output=True).returncode == 0
        )

    if works():
        return
    for d in ("/run/munge", "/var/log/munge", "/var/lib/munge", "/etc/munge"):
        os.makedirs(d, exist_ok=True)
        shutil.chown(d, "munge", "munge")
    if not Path("/etc/munge/munge.key").exists():
        _run(["mungekey", "--create"])
        shutil.chown("/etc/munge/munge.key", "munge", "munge")
    _run(["su", "-s", "/bin/sh", "munge", "-c", "munged --force"])
    _wait_for("munged", works, 15)


def start_mariadb(layout: LocalClusterLayout) -> None:
    datadir = layout.mariadb_dir / "data"
    sock = layout.mariadb_dir / "mysqld.sock"
    if _pid_alive(layout.pid_file("mariadb")) and _port_open(layout.mariadb_port):
        return
    if not (datadir / "mysql").exists():
        datadir.mkdir(parents=True, exist_ok=True)
        _run(
            [
                "mariadb-install-db",
                f"--datadir={datadir}",
                "--user=root",
                "--skip-test-db",
                "--auth-root-authentication-method=socket",
            ]
        )
    _refuse_taken_port(layout.mariadb_port, "mariadb")
    log = layout.log / "mariadb.log"
    subprocess.Popen(
        [
            "mariadbd",
            "--no-defaults",
            f"--datadir={datadir}",
            "--user=root",
            f"--socket={sock}",
            f"--port={layout.mariadb_port}",
            "--bind-address=127.0.0.1",
            f"--pid-file={layout.pid_file('mariadb')}",
            f"--log-error={log}",
            "--innodb-buffer-pool-size=64M",
            "--skip-log-bin",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    _wait_for("MariaDB", lambda: _port_open(layout.mariadb_port) and sock.exists(), 60, log)
    sql = (
        f"CREATE DATABASE IF NOT EXISTS {layout.db_name};"
        f"CREATE USER IF NOT EXISTS '{layout.db_user}'@'127.0.0.1' IDENTIFIED BY '{layout.db_password}';"
        f"CREATE USER IF NOT EXISTS '{layout.db_user}'@'localhost' IDENTIFIED BY '{layout.db_password}';"
        f"GRANT ALL ON {layout.db_name}.* TO '{layout.db_user}'@'127.0.0.1';"
        f"GRANT ALL ON {layout.db_name}.* TO '{layout.db_user}'@'localhost';"
        f"CREATE DATABASE IF NOT EXISTS {layout.optuna_db_name};"
        f"GRANT ALL ON {layout.optuna_db_name}.* TO '{layout.db_user}'@'127.0.0.1';FLUSH PRIVILEGES;"
    )
    _run(["mariadb", f"--socket={sock}", "-u", "root", "-e", sql])


def start_slurmdbd(layout: LocalClusterLayout) -> None:
    if _pid_alive(layout.pid_file("slurmdbd")):
        return
    _refuse_taken_port(layout.slurmdbd_port, "slurmdbd")
    # slurmdbd has no -f: it reads slurmdbd.conf from the directory of $SLURM_CONF.
    _run(["slurmdbd"], env=_slurm_env(layout))
    _wait_for("slurmdbd", lambda: _port_open(layout.slurmdbd_port), 60, layout.log / "slurmdbd.log")


def register_accounting(layout: LocalClusterLayout) -> None:
    env = _slurm_env(layout)
    user = os.environ.get("USER") or subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip()
    # Idempotent: sacctmgr answers "already exists" with a non-zero status that we ignore on purpose.
    for cmd in (
        ["sacctmgr", "-i", "add", "cluster", layout.cluster_name],
        ["sacctmgr", "-i", "add", "account", "hpcml", f"cluster={layout.cluster_name}"],
        ["sacctmgr", "-i", "add", "user", user, "account=hpcml", f"cluster={layout.cluster_name}"],
    ):
        _run(cmd, check=False, env=env)
    listed = _run(["sacctmgr", "-n", "-P", "list", "cluster", "format=cluster"], env=env, check=False).stdout
    if layout.cluster_name not in listed.split():
        raise LocalClusterError(f"slurmdbd did not register cluster {layout.cluster_name}: {listed!r}")


def start_slurmctld(layout: LocalClusterLayout) -> None:
    if _pid_alive(layout.pid_file("slurmctld")):
        return
    _refuse_taken_port(layout.slurmctld_port, "slurmctld")
    _run(["slurmctld", "-f", str(layout.slurm_conf)], env=_slurm_env(layout))
    _wait_for(
        "slurmctld",
        lambda: _run(["scontrol", "ping"], check=False, env=_slurm_env(layout)).stdout.count("UP") > 0,
        60,
        layout.log / "slurmctld.log",
    )


def paths_to_keep_visible(layout: LocalClusterLayout) -> list[Path]:
    """Paths under /tmp that jobs still need once the node's own /tmp covers it (a checkout in /tmp)."""
    candidates = {layout.state_dir.resolve(), Path(sys.prefix).resolve(), Path.cwd().resolve()}
    under_tmp = [p for p in candidates if p.is_relative_to("/tmp")]
    # A path inside another one is visible once its ancestor is.
    return sorted(p for p in under_tmp if not any(p != q and p.is_relative_to(q) for q in under_tmp))


def slurmd_namespace_script(layout: LocalClusterLayout, node: str) -> str:
    tmp = layout.node_tmp(node)
    lines = ["set -e"]
    for keep in paths_to_keep_visible(layout):
        inside = tmp / "tmp" / keep.relative_to("/tmp")
        lines += [f"mkdir -p '{inside}'", f"mount --rbind '{keep}' '{inside}'"]
    lines += [
        f"mount --rbind '{tmp}/tmp' /tmp",
        "mount -t tmpfs -o size=1g tmpfs /dev/shm",
        f"exec slurmd -N {node} -f '{layout.slurm_conf}'",
    ]
    return "\n".join(lines)


def clear_stale_step_dirs(node_tmp: Path) -> list[Path]:
    """Remove what killed step daemons left in a node's /tmp; returns what was removed. A step's PMIx
    directory (`spmix_appdir_<uid>_<job>.<step>`) goes when its step daemon ends, but one killed with its
    cluster leaves it, and a new cluster numbers its jobs from 1 again: seen, job 19's first step then failed
    to launch on that node ("task 0 launch failed"), in every attempt. Call it while no slurmd runs there."""
    stale = sorted(node_tmp.glob("spmix_appdir_*"))
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def start_slurmd(layout: LocalClusterLayout, node: str) -> None:
    if _pid_alive(layout.run / f"slurmd-{node}.pid"):
        return
    (layout.node_tmp(node) / "tmp").mkdir(parents=True, exist_ok=True)
    os.chmod(layout.node_tmp(node) / "tmp", 0o1777)
    for path in clear_stale_step_dirs(layout.node_tmp(node) / "tmp"):
        print(f"removed {path}, left by a step of an earlier cluster", file=sys.stderr)
    (layout.state_dir / "slurmd" / node).mkdir(parents=True, exist_ok=True)
    script = slurmd_namespace_script(layout, node)
    _run(["unshare", "-m", "--propagation", "private", "sh", "-c", script], env=_slurm_env(layout))


def wait_nodes_idle(layout: LocalClusterLayout, timeout_s: float = 60) -> None:
    env = _slurm_env(layout)

    def states() -> dict[str, str]:
        out = _run(["sinfo", "-N", "-h", "-o", "%N %T"], check=False, env=env).stdout
        return dict(line.split() for line in out.splitlines() if line.strip())

    # Nodes left down or drained by an earlier unclean stop are put back into service.
    for node, state in states().items():
        if any(s in state for s in ("down", "drain", "fail")):
            _run(["scontrol", "update", f"nodename={node}", "state=resume"], check=False, env=env)

    def all_ready() -> bool:
        st = states()
        return len(st) == len(layout.nodes) and all(
            s.rstrip("*") in ("idle", "mixed", "allocated", "completing") for s in st.values()
        )

    _wait_for("the slurmd nodes", all_ready, timeout_s, layout.log / f"slurmd-{layout.nodes[-1]}.log")


def install_system_conf(layout: LocalClusterLayout) -> None:
    """Point /etc/slurm/slurm.conf at ours so plain `sbatch` works, unless a site owns that file."""
    if SYSTEM_SLURM_CONF.is_symlink() or not SYSTEM_SLURM_CONF.exists():
        SYSTEM_SLURM_CONF.parent.mkdir(parents=True, exist_ok=True)
        SYSTEM_SLURM_CONF.unlink(missing_ok=True)
        SYSTEM_SLURM_CONF.symlink_to(layout.slurm_conf)


def check_not_a_site_cluster() -> None:
    if SYSTEM_SLURM_CONF.exists() and not SYSTEM_SLURM_CONF.is_symlink():
        if MARKER not in SYSTEM_SLURM_CONF.read_text(errors="replace"):
            raise LocalClusterError(
                f"{SYSTEM_SLURM_CONF} belongs to a site Slurm installation; hpcml will not start a local "
                "cluster here. Submit to the site's cluster instead: python jobs/train.py cluster=<site>."
            )


# ---------------------------------------------------------------- public verbs


def up(layout: LocalClusterLayout) -> None:
    check_not_a_site_cluster()
    ensure_packages()
    for d in (layout.etc, layout.log, layout.run, layout.state_dir / "slurmctld"):
        d.mkdir(parents=True, exist_ok=True)
    conf = render_slurm_conf(layout)
    changed = not layout.slurm_conf.is_file() or layout.slurm_conf.read_text() != conf
    layout.slurm_conf.write_text(conf)
    layout.slurmdbd_conf.write_text(render_slurmdbd_conf(layout))
    os.chmod(layout.slurmdbd_conf, 0o600)  # slurmdbd refuses a world-readable file holding a password
    start_munge()
    start_mariadb(layout)
    start_slurmdbd(layout)
    register_accounting(layout)
    if changed and _pid_alive(layout.pid_file("slurmctld")):
        # Already running with other settings: every daemon rereads slurm.conf.
        _run(["scontrol", "reconfigure"], env=_slurm_env(layout))
    start_slurmctld(layout)
    for node in layout.nodes:
        start_slurmd(layout, node)
    wait_nodes_idle(layout)
    install_system_conf(layout)
    print(f"local Slurm cluster '{layout.cluster_name}' is up: {len(layout.nodes)} nodes, state in {layout.state_dir}")


def _stop(pid_file: Path, name: str, timeout_s: float = 20) -> None:
    pid = _pid_alive(pid_file)
    if pid is None:
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except OSError:
            break
        time.sleep(0.2)
    else:
        print(f"{name} (pid {pid}) ignored SIGTERM for {timeout_s:.0f}s; sending SIGKILL", file=sys.stderr)
        os.kill(pid, signal.SIGKILL)
    print(f"stopped {name} (pid {pid})")


def down(layout: LocalClusterLayout) -> None:
    for node in reversed(layout.nodes):
        _stop(layout.run / f"slurmd-{node}.pid", f"slurmd {node}")
    _stop(layout.pid_file("slurmctld"), "slurmctld")
    _stop(layout.pid_file("slurmdbd"), "slurmdbd")
    _stop(layout.pid_file("mariadb"), "mariadb", timeout_s=60)
    if SYSTEM_SLURM_CONF.is_symlink() and SYSTEM_SLURM_CONF.resolve() == layout.slurm_conf.resolve():
        SYSTEM_SLURM_CONF.unlink()


def status(layout: LocalClusterLayout) -> int:
    pids = {
        "mariadb": layout.pid_file("mariadb"),
        "slurmdbd": layout.pid_file("slurmdbd"),
        "slurmctld": layout.pid_file("slurmctld"),
        **{f"slurmd {n}": layout.run / f"slurmd-{n}.pid" for n in layout.nodes},
    }
    all_up = True
    for name, pid_file in pids.items():
        pid = _pid_alive(pid_file)
        all_up &= pid is not None
        print(f"{name:12s} {f'up (pid {pid})' if pid else 'down'}")
    if all_up:
        print(_run(["sinfo"], check=False, env=_slurm_env(layout)).stdout, end="")
    return 0 if all_up else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hpcml.localcluster", description=__doc__.splitlines()[0])
    parser.add_argument("verb", choices=["up", "down", "status"])
    parser.add_argument("--state-dir", type=Path, default=Path(".cluster"), help="where all state lives")
    parser.add_argument("--job-requeue", type=int, choices=(0, 1), default=1, help="slurm.conf JobRequeue")
    parser.add_argument(
        "--batch-preempt-mode", choices=("REQUEUE", "CANCEL"), default="REQUEUE", help="what preemption does to 'batch'"
    )
    parser.add_argument("--max-array-size", type=int, default=1001, help="slurm.conf MaxArraySize")
    args = parser.parse_args(argv)
    layout = LocalClusterLayout(
        state_dir=args.state_dir.resolve(),
        job_requeue=bool(args.job_requeue),
        batch_preempt_mode=args.batch_preempt_mode,
        max_array_size=args.max_array_size,
    )
    try:
        if args.verb == "up":
            up(layout)
        elif args.verb == "down":
            down(layout)
        else:
            return status(layout)
    except LocalClusterError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
