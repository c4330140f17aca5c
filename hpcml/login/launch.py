"""From a validated config to a Slurm job: preflight checks, the submitit executor, and following a job.

Everything that can be checked on the login node is checked before submission, so a bad config never
leaves a half-submitted job behind.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import submitit

import hpcml
from hpcml.config import ClusterConfig, TrainJobConfig, to_plain_dict
from hpcml.errors import SubmissionError
from hpcml.job_entry import TrainingJob
from hpcml.login import slurm
from hpcml.login.polling import poll_until
from hpcml.outputs import RESULT_FILE

JOB_FOLDER = "slurm"
# Sourced by the batch script: runs the step so that the batch shell survives a stop (see the file).
BATCH_SHELL = Path(hpcml.__file__).resolve().parent / "compute" / "batch_shell.sh"


class HpcmlSlurmExecutor(submitit.SlurmExecutor):
    """submitit's executor, with each rank started by hpcml.compute.submitit_main instead of submitit's own
    runner, so that a stop signal is recorded from the rank's first moments; and with no time-limit warning
    at all when `warning_signal` is off."""

    # submitit always renders `--signal=USR2@90`, and Slurm has no value that turns --signal off again.
    warning_signal: bool = True
    # The most tasks the job runs (submitit's own count assumes a fixed node count).
    max_tasks: int | None = None

    def _num_tasks(self) -> int:
        return self.max_tasks if self.max_tasks is not None else super()._num_tasks()

    @property
    def _submitit_command_str(self) -> str:
        return " ".join([self.python, "-u -m hpcml.compute.submitit_main", shlex.quote(str(self.folder))])

    def _make_submission_file_text(self, command: str, uid: str) -> str:
        text = super()._make_submission_file_text(command, uid)
        if self.warning_signal:
            return text
        return "\n".join(line for line in text.split("\n") if not line.startswith("#SBATCH --signal="))


def preflight(cfg: TrainJobConfig) -> None:
    """Refuse, before submitting, what the cluster cannot run."""
    c = cfg.cluster
    available = slurm.partitions()
    if c.partition is not None and c.partition not in available:
        raise SubmissionError(
            f"cluster.partition={c.partition} does not exist on this cluster; available: "
            f"{', '.join(sorted(available))}. Set cluster.partition to one of them."
        )
    chosen = available.get(c.partition) if c.partition else next((p for p in available.values() if p.is_default), None)
    if chosen is not None and c.nodes > chosen.nodes:
        raise SubmissionError(
            f"cluster.nodes={c.nodes} but partition {chosen.name} has only {chosen.nodes} nodes; lower cluster.nodes."
        )
    if chosen is not None and c.gpus_per_node > chosen.gpus_per_node:
        # Slurm would hold the job pending for ever (or reject it with a message about gres); say it plainly.
        has = f"{chosen.gpus_per_node} GPUs per node" if chosen.gpus_per_node else "no GPUs"
        raise SubmissionError(
            f"cluster.gpus_per_node={c.gpus_per_node} but partition {chosen.name} has {has}; pick a partition "
            "with GPUs (cluster.partition) or lower cluster.gpus_per_node (0: a CPU job)."
        )


def batch_shell_setup(cfg: TrainJobConfig, folder: Path) -> list[str]:
    """Lines that make the batch script run its srun through hpcml_run_step (hpcml/compute/batch_shell.sh)."""
    max_requeues = cfg.preempt.max_requeues if cfg.preempt.requeue else 0
    settings = {
        "HPCML_STOP_SIGNAL": cfg.preempt.signal.upper().removeprefix("SIG"),
        "HPCML_STARTUP_RETRIES_MAX": cfg.cluster.startup_retries,
        "HPCML_MAX_REQUEUES": max_requeues,
        "HPCML_MAX_MIGRATIONS": cfg.cluster.max_migrations if cfg.preempt.requeue else 0,
        "HPCML_MIN_NODES": cfg.cluster.node_counts.start,
        "HPCML_STEP_RECORDS": folder / "steps",
    }
    return [
        "# hpcml: srun runs in the background, in its own session, so that this shell survives a TERM and passes",
        "# it on as a stop, and a step that dies while starting is relaunched (see batch_shell.sh).",
        "export " + " ".join(f"{k}={_shell_quote(v)}" for k, v in settings.items()),
        f"source {_shell_quote(BATCH_SHELL)}",
        'srun() { hpcml_run_step srun "$@"; }',
    ]


def make_executor(cfg: TrainJobConfig, folder: Path) -> submitit.SlurmExecutor:
    c = cfg.cluster
    executor = HpcmlSlurmExecutor(folder=folder)
    executor.warning_signal = cfg.preempt.signal_lead_s > 0
    params: dict[str, Any] = dict(
        job_name=f"hpcml-{c.name}",
        nodes=c.nodes,
        ntasks_per_node=c.tasks_per_node,
        cpus_per_task=c.cpus_per_task,
        time=c.time_min,
        srun_args=list(c.srun_args),
        setup=[
            *c.setup,
            *(f"export {k}={_shell_quote(v)}" for k, v in c.job_env.items()),
            *batch_shell_setup(cfg, folder),
        ],
        stderr_to_stdout=False,
        # Only used by job arrays (sweeps): how many trials may run at once.
        array_parallelism=cfg.launch.array_parallelism,
        additional_parameters={
            # Asked for explicitly: a site may default to JobRequeue=0, and then rank 0's requeue is refused.
            "requeue": True,
            # The time-limit warning goes to every rank (no "B:"): each one can then stop at a step boundary.
            # With signal_lead_s=0 the line is dropped (see HpcmlSlurmExecutor) and the deadline alone stops it.
            "signal": f"{cfg.preempt.signal.upper().removeprefix('SIG')}@{cfg.preempt.signal_lead_s}",
        },
    )
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(c, key) is not None:
            params[key] = getattr(c, key)
    if c.elastic:
        _make_elastic(params, c)
        executor.max_tasks = c.world_size
    if c.gpus_per_node:
        params["gpus_per_node"] = c.gpus_per_node
    if c.mem_gb is not None:
        params["mem"] = f"{c.mem_gb}GB"
    executor.update_parameters(**params)
    return executor


def _make_elastic(params: dict[str, Any], c: ClusterConfig) -> None:
    """`--nodes=<min>-<max>` with the ranks per node given to srun, not to sbatch.

    Slurm fixes a job's task count when it first starts: with `--ntasks-per-node` in the batch script, a job
    that ran on 2 nodes needs 2 nodes' worth of tasks after a requeue, and never fits on fewer (measured
    on the local cluster). `--mincpus` reserves each node's CPUs instead, and srun starts the ranks on
    whatever nodes this attempt got.
    """
    params["nodes"] = f"{c.min_nodes}-{c.nodes}"
    params["ntasks_per_node"] = None
    params["cpus_per_task"] = None
    params["additional_parameters"]["mincpus"] = c.tasks_per_node * c.cpus_per_task
    params["srun_args"] = [
        *params["srun_args"],
        f"--ntasks-per-node={c.tasks_per_node}",
        f"--cpus-per-task={c.cpus_per_task}",
    ]


def prepare_job_folder(folder: Path) -> None:
    """Where submitit keeps scripts, pickles and rank logs: private, as loading a pickle runs code."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)


def _shell_quote(value: str) -> str:
    return shlex.quote(str(value))


def render_sbatch(cfg: TrainJobConfig, folder: Path, array_size: int | None = None) -> str:
    """The exact batch script `submit` (or, with array_size, a sweep's array) would hand to sbatch.

    submitit renders it; these are its private hooks, pinned by the golden-file tests."""
    executor = make_executor(cfg, folder)
    if array_size is not None:
        executor.parameters["map_count"] = array_size
    return executor._make_submission_file_text(executor._submitit_command_str, uid="render")


def submit(cfg: TrainJobConfig) -> submitit.Job | None:
    """Submit one run; with launch.dry_run, print the batch script instead and return None."""
    preflight(cfg)
    output_dir = Path(cfg.train.output_dir).resolve()
    folder = output_dir / JOB_FOLDER
    if cfg.launch.dry_run:
        print(render_sbatch(cfg, folder))
        return None
    prepare_job_folder(folder)
    executor = make_executor(cfg, folder)
    job = executor.submit(TrainingJob(to_plain_dict(cfg)))
    nodes = f"{cfg.cluster.min_nodes}-{cfg.cluster.nodes}" if cfg.cluster.elastic else cfg.cluster.nodes
    print(f"submitted Slurm job {job.job_id}: {nodes} nodes x {cfg.cluster.tasks_per_node} ranks")
    print(f"  outputs: {output_dir}")
    print(f"  rank 0 log: {job.paths.stderr}")
    print(f"  follow:  squeue -j {job.job_id}   |   tail -f {job.paths.stderr}")
    return job


def wait_for(job: submitit.Job, output_dir: str | Path, poll_s: float, elastic: bool = False) -> dict[str, Any]:
    """Block until the job ends; return its result.json, or raise with the failure and where to look. An
    elastic job's last attempt may have run fewer ranks than it could: only those are asked for an outcome."""
    print(f"job {job.job_id}: submitted", flush=True)
    final_state = poll_until(
        lambda: job.watcher.get_state(job.job_id, mode="force"),
        # Done means Slurm says the job ended, not merely that rank 0 wrote its result: only then are the
        # accounting records and every rank's log final.
        lambda _: job.watcher.is_done(job.job_id, mode="cache"),
        poll_s,
        # UNKNOWN: neither squeue nor sacct lists the job yet; "submitted" already says all that is known.
        lambda state: None if state == "UNKNOWN" else f"job {job.job_id}: {state}",
    )
    result_path = Path(output_dir) / RESULT_FILE
    try:
        if not elastic:
            job.results()  # one entry per rank; raises with the failing rank's traceback
        else:
            ranks = json.loads(result_path.read_text())["world_size"] if result_path.exists() else 1
            for rank in range(ranks):
                job.task(rank).result()
    except Exception as err:  # submitit raises FailedJobError / UncompletedJobError with the rank's traceback
        raise SubmissionError(f"job {job.job_id} failed ({final_state}); log: {job.paths.stderr}\n{err}") from err
    if not result_path.exists():
        raise SubmissionError(f"job {job.job_id} ended but wrote no {result_path}; see {job.paths.stderr}")
    return json.loads(result_path.read_text())
