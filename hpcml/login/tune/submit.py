"""From a checked study to its driver's Slurm job, in seconds; and `hpcml resume <study>`.

The login node does only what must happen before anything runs: the study directory, the study in its
storage (so an unreachable storage fails here), and one small job, the driver (hpcml.login.tune.driver),
which submits every trial. The login shell is then free: nothing of the study runs on it.

The driver's batch script is hpcml's own, not submitit's: one process, no srun, and no signal may end it
early. Measured on the local cluster: a driver started by submitit (srun, Python starting up) that a
partition preemption reached in its first second died of the TERM, and the job ended FAILED instead of
being requeued. Here the batch shell ignores TERM and `exec`s the driver, which inherits that: a preemption
or `scontrol requeue` TERMs it, Slurm kills it after the grace time and requeues it, and a `scancel` ends
it for good. Before its time limit, the warning (USR2) makes it requeue itself.
"""

from __future__ import annotations

import json
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import optuna

from hpcml.config import TrainJobConfig, to_plain_dict, validate
from hpcml.fileio import write_atomically
from hpcml.login import launch, slurm
from hpcml.login.tune.study import (
    DRIVER_FOLDER,
    STUDY_FILE,
    TEMPLATE_CONFIG,
    StudyError,
    StudySpec,
    load_trials,
    make_pruner,
    make_sampler,
    open_storage,
)
from hpcml.slurm_commands import ACTIVE_STATES, run

# The driver's job ids, oldest first (a resumed study has more than one).
DRIVER_RECORD = "driver.json"
DRIVER_SCRIPT = "driver.sbatch"
# Seconds before its time limit that the driver is told to requeue itself: far more than it needs.
TIME_LIMIT_WARNING_S = 120


@dataclass(frozen=True)
class DriverResources:
    # Minutes per attempt of the driver's job. At the limit it requeues itself and carries on, so this bounds
    # one attempt, not the study.
    time_min: int = 240
    mem_gb: float | None = None


def submit_study(
    spec: StudySpec, study_dir: Path, template: TrainJobConfig, resources: DriverResources, dry_run: bool = False
) -> str | None:
    """Create the study and submit its driver; returns the driver's job id (None for a dry run)."""
    launch.preflight(template)
    study_dir = Path(study_dir).resolve()
    if (study_dir / STUDY_FILE).exists():
        raise StudyError(
            f"{study_dir} holds a study already; resume it with `hpcml resume {study_dir}`, or give another "
            "hydra.sweep.dir."
        )
    make_sampler(spec), make_pruner(spec)  # their arguments fail here, not in the driver's log
    script = driver_script(template, study_dir, spec, resources)
    if dry_run:
        print(script)
        return None
    storage = open_storage(spec, study_dir)  # an unreachable database fails here, with nothing written
    try:
        optuna.create_study(storage=storage, study_name=spec.name, direction=spec.direction)
    except optuna.exceptions.DuplicatedStudyError as err:
        raise StudyError(
            f"the storage holds a study named {spec.name} already; give another hydra.sweeper.study_name."
        ) from err
    study_dir.mkdir(parents=True, exist_ok=True)
    plain = json.dumps(to_plain_dict(template), indent=2).encode()
    write_atomically(study_dir / TEMPLATE_CONFIG, lambda f: f.write(plain))
    spec.save(study_dir)
    return submit_driver(script, study_dir)


def driver_script(template: TrainJobConfig, study_dir: Path, spec: StudySpec, resources: DriverResources) -> str:
    """One process on one CPU, in the trials' partition, requeueable (a site may default to JobRequeue=0)."""
    c = template.cluster
    folder = Path(study_dir) / DRIVER_FOLDER
    options = [
        f"--job-name={spec.driver_job_name}",
        "--nodes=1",
        "--ntasks=1",
        "--cpus-per-task=1",
        f"--time={resources.time_min}",
        "--requeue",
        f"--signal=B:USR2@{TIME_LIMIT_WARNING_S}",
        f"--output={folder}/%j.log",
        "--open-mode=append",
    ]
    options += [f"--{key}={getattr(c, key)}" for key in ("partition", "account", "qos") if getattr(c, key)]
    if resources.mem_gb is not None:
        options.append(f"--mem={resources.mem_gb}GB")
    command = [sys.executable, "-u", "-m", "hpcml.login.tune.driver", str(Path(study_dir).resolve())]
    return "\n".join(
        [
            "#!/bin/bash",
            *(f"#SBATCH {option}" for option in options),
            "",
            *c.setup,
            "# A preemption, `scontrol requeue` or `scancel` TERMs every process of the job; none may end it before",
            "# Slurm does (an ended job is not requeued). exec: the driver is this process, and ignores TERM too.",
            "trap '' TERM",
            "exec " + " ".join(shlex.quote(part) for part in command),
            "",
        ]
    )


def submit_driver(script: str, study_dir: Path) -> str:
    folder = study_dir / DRIVER_FOLDER
    launch.prepare_job_folder(folder)
    (folder / DRIVER_SCRIPT).write_text(script)
    job_id = run(["sbatch", "--parsable", str(folder / DRIVER_SCRIPT)]).strip().split(";")[0]
    record = study_dir / DRIVER_RECORD
    earlier = json.loads(record.read_text())["job_ids"] if record.is_file() else []
    data = json.dumps({"job_ids": [*earlier, job_id]}).encode()
    write_atomically(record, lambda f: f.write(data))
    return job_id


def driver_job_id(study_dir: Path) -> str | None:
    record = Path(study_dir) / DRIVER_RECORD
    try:
        return json.loads(record.read_text())["job_ids"][-1]
    except (OSError, ValueError, KeyError, IndexError):
        return None


def load_template(study_dir: Path) -> TrainJobConfig:
    path = Path(study_dir) / TEMPLATE_CONFIG
    try:
        return validate(json.loads(path.read_text()))
    except (OSError, ValueError) as err:
        raise StudyError(f"{path} is missing or unreadable ({err}): the study cannot go on without it.") from err


def resume_study(study_dir: Path) -> str:
    """Submit the driver's script again (it re-attaches to every trial queued or running); refused while a
    driver of the study is queued or running."""
    study_dir = Path(study_dir).resolve()
    spec = StudySpec.load(study_dir)
    job_id = driver_job_id(study_dir)
    if job_id is not None:
        state = slurm.array_task_states([job_id]).get(job_id, ("UNKNOWN", ""))[0]
        if state in ACTIVE_STATES:
            raise StudyError(
                f"the study's driver, job {job_id}, is {state.lower()}: it carries on by itself. "
                f"Follow it with `hpcml status {study_dir}`; `scancel {job_id}` first to replace it."
            )
    trials = load_trials(study_dir)
    if len(trials) >= spec.n_trials and all(t.outcome != "running" for t in trials):
        raise StudyError(f"the study in {study_dir} has finished all {spec.n_trials} trials; nothing to resume.")
    script = study_dir / DRIVER_FOLDER / DRIVER_SCRIPT
    if not script.is_file():
        raise StudyError(f"{script} is missing: the study's driver cannot be submitted again.")
    load_template(study_dir)  # the driver needs it: say so here, not in its log
    return submit_driver(script.read_text(), study_dir)
