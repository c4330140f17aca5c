"""Sweeps on Slurm: trials -> one job array per resource shape, submitted without waiting; the sweep's
record (`sweep.json`), and each trial's state read back from Slurm and from its output directory.

The Hydra launcher plugin (hydra_plugins/hpcml_launcher) turns `jobs/train.py -m ...` into `Trial`s and
calls `submit_trials`; `hpcml status/report/resume` read what this module writes.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from hpcml.config import LaunchConfig, TrainJobConfig, to_plain_dict, validate
from hpcml.errors import HpcmlError
from hpcml.fileio import write_atomically
from hpcml.job_entry import TrainingJob
from hpcml.login import launch, slurm
from hpcml.login.polling import poll_until
from hpcml.outputs import JOB_RECORD, METRICS_FILE, RESULT_FILE, read_metrics, read_objective
from hpcml.slurm_commands import ACTIVE_STATES, TERMINAL_STATES

SWEEP_FILE = "sweep.json"
DEFAULT_OBJECTIVE = LaunchConfig.objective
TRIAL_CONFIG = "trial_config.json"
# libyaml's emitter where PyYAML was built with it: OmegaConf's pure-Python one dominated a trial's cost.
_YamlDumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


class SweepError(HpcmlError):
    """A sweep directory, a sweep definition or a sweep query is not usable; the message says why."""


@dataclass
class Trial:
    num: int
    overrides: list[str]
    dir: str
    job_id: str | None = None
    # Job ids of earlier submissions of this trial (hpcml resume), oldest first.
    previous_job_ids: list[str] = field(default_factory=list)


@dataclass
class Sweep:
    path: Path
    trials: list[Trial]
    created: float
    # The trials' launch.objective: the metric `hpcml status` shows and `hpcml report` ranks by default.
    objective: str = DEFAULT_OBJECTIVE

    @property
    def record(self) -> Path:
        return self.path / SWEEP_FILE

    def save(self) -> None:
        data = {"created": self.created, "objective": self.objective, "trials": [asdict(t) for t in self.trials]}
        write_atomically(self.record, lambda f: f.write(json.dumps(data, indent=2).encode()))


def open_sweep(path: Path, trials: list[Trial], objective: str = DEFAULT_OBJECTIVE) -> Sweep:
    """The sweep at `path` with `trials` added: sweepers that launch in batches (Optuna) add to one record."""
    if (Path(path) / SWEEP_FILE).is_file():
        sweep = load_sweep(path)
        known = {t.num for t in sweep.trials}
        sweep.trials += [t for t in trials if t.num not in known]
        return sweep
    return Sweep(Path(path), list(trials), time.time(), objective)


def load_sweep(path: Path, single_runs: bool = False) -> Sweep:
    """The sweep recorded at `path`; with single_runs, a submitted single run's directory is read as a sweep
    of one trial (for `hpcml status`)."""
    record = Path(path) / SWEEP_FILE
    if not record.is_file():
        job_id = submitted_job_id(Path(path)) if single_runs else None
        if job_id is not None:
            return Sweep(Path(path), [Trial(0, [], ".", job_id)], Path(path).stat().st_mtime)
        raise SweepError(
            f"{path} is not a sweep directory (no {SWEEP_FILE})"
            + (" nor the directory of a submitted run" if single_runs else "")
            + "; give the directory that `python jobs/train.py -m ...` printed, e.g. outputs/sweeps/<time>."
        )
    try:
        data = json.loads(record.read_text())
        # Records written before the objective was kept have the default one.
        objective = data.get("objective", DEFAULT_OBJECTIVE)
        return Sweep(Path(path), [Trial(**t) for t in data["trials"]], data["created"], objective)
    except (ValueError, KeyError, TypeError) as err:
        raise SweepError(f"{record} is unreadable: {err}") from err


def submitted_job_id(run_dir: Path) -> str | None:
    """The Slurm job a single run's directory belongs to: its job record, else submitit's pickle."""
    try:
        return str(json.loads((run_dir / JOB_RECORD).read_text())["job_id"])
    except (OSError, ValueError, KeyError):
        pass
    pickles = sorted((run_dir / launch.JOB_FOLDER).glob("*_submitted.pkl"), key=lambda p: p.stat().st_mtime)
    return pickles[-1].name.split("_")[0] if pickles else None


def trial_config(sweep: Sweep, trial: Trial) -> TrainJobConfig:
    return validate(json.loads((sweep.path / trial.dir / TRIAL_CONFIG).read_text()))


# ---------------------------------------------------------------- submission


def _resource_key(cfg: TrainJobConfig) -> str:
    """Trials can share one array only if Slurm gives them the same resources."""
    return json.dumps(asdict(cfg.cluster), sort_keys=True) + json.dumps(asdict(cfg.preempt), sort_keys=True)


def plan_arrays(configs: list[TrainJobConfig], limit: int) -> list[list[int]]:
    """Indices of `configs` grouped into arrays: one per resource shape, split below Slurm's MaxArraySize."""
    groups: dict[str, list[int]] = {}
    for i, cfg in enumerate(configs):
        groups.setdefault(_resource_key(cfg), []).append(i)
    size = max(1, limit - 1)  # array indices run from 0 to MaxArraySize - 1
    return [members[k : k + size] for members in groups.values() for k in range(0, len(members), size)]


def write_trial_files(sweep_dir: Path, trial: Trial, cfg: TrainJobConfig) -> None:
    """The trial's resolved config: as JSON for `hpcml resume`, as YAML and its overrides for people."""
    trial_dir = sweep_dir / trial.dir
    trial_dir.mkdir(parents=True, exist_ok=True)
    plain = to_plain_dict(cfg)
    write_atomically(trial_dir / TRIAL_CONFIG, lambda f: f.write(json.dumps(plain, indent=2).encode()))
    (trial_dir / "config.yaml").write_text(yaml.dump(plain, Dumper=_YamlDumper, sort_keys=False))
    (trial_dir / "overrides.yaml").write_text(yaml.dump(trial.overrides, Dumper=_YamlDumper))


def submit_trials(sweep: Sweep, trials: list[Trial], configs: list[TrainJobConfig], dry_run: bool = False) -> list[str]:
    """Submit `trials` (already validated) as job arrays; returns the scripts when dry_run, else []."""
    if not trials:
        raise SweepError("the sweep is empty: no trial to submit. Give values to sweep, e.g. optim.lr=0.01,0.1")
    launch.preflight(configs[0])
    folder = sweep.path / launch.JOB_FOLDER
    launch.prepare_job_folder(folder)
    arrays = plan_arrays(configs, slurm.max_array_size() if not dry_run else 1001)
    scripts = []
    for members in arrays:
        first = configs[members[0]]
        if dry_run:
            scripts.append(launch.render_sbatch(first, folder, array_size=len(members)))
            continue
        executor = launch.make_executor(first, folder)
        with executor.batch():
            jobs = [executor.submit(TrainingJob(to_plain_dict(configs[i]))) for i in members]
        for i, job in zip(members, jobs, strict=True):
            trial = trials[i]
            if trial.job_id:
                trial.previous_job_ids.append(trial.job_id)
            trial.job_id = job.job_id
        sweep.save()  # after every array: what was submitted is on record even if a later one fails
        print(f"submitted {len(members)} trials as Slurm array {jobs[0].job_id.split('_')[0]}")
    return scripts


# ---------------------------------------------------------------- state


@dataclass
class TrialStatus:
    num: int
    overrides: str
    state: str
    restarts: int
    # Steps relaunched after dying at start-up outside the job's code (batch_shell.sh), over all attempts.
    startup_retries: int
    # How many nodes each attempt ran on, first to last ("2,1": an elastic job that came back on one).
    attempt_nodes: str
    # Nodes the job lost ranks on and requeued itself without (cluster.max_migrations), comma-separated.
    lost_nodes: str
    step: int
    loss: float | None
    # The latest value of the sweep's objective metric (launch.objective) the trial logged.
    objective: float | None
    elapsed: str
    error: str


def _metrics(trial_dir: Path, objective: str) -> tuple[int, float | None, float | None]:
    """The trial's last logged step and loss, and the latest value of `objective`: from metrics.jsonl, or,
    for a figure only result.json holds (final_loss, samples_per_s), from there once the trial finished."""
    step, loss, value = 0, None, None
    for record in read_metrics(trial_dir / METRICS_FILE):
        step = max(step, record.get("step", 0))
        loss = record.get("loss", loss)
        value = record.get(objective, value)
    if value is None:
        try:
            value = read_objective(trial_dir, objective)
        except (OSError, ValueError, HpcmlError):  # unreadable, or it holds no such figure: shown blank
            value = None
    return step, loss, value


_ERROR_LINE = re.compile(r"^(?:\[rank \d+\] )?([A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Exit)\b.*)$")


def first_error(sweep: Sweep, trial: Trial) -> str:
    """The first exception line in the trial's rank logs, or the last line Slurm wrote there."""
    if not trial.job_id:
        return ""
    logs = sorted((sweep.path / launch.JOB_FOLDER).glob(f"{trial.job_id}_*_log.err"))
    fallback = ""
    for log in logs:
        lines = [line.rstrip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
        for line in lines:
            match = _ERROR_LINE.match(line)
            if match and not match.group(1).startswith("submitit"):
                return match.group(1)
        if lines and not fallback:
            fallback = lines[-1]
    return fallback


def job_record_count(trial_dir: Path, key: str) -> int:
    """A count from the trial's slurm_job.json: restart_count, startup_retries; 0 before it exists."""
    try:
        return int(json.loads((trial_dir / JOB_RECORD).read_text()).get(key, 0))
    except (OSError, ValueError, TypeError):
        return 0


def job_record_list(trial_dir: Path, key: str) -> str:
    """A list from the trial's slurm_job.json, comma-separated: attempt_nodes (each attempt's node count),
    lost_nodes; "" before it exists."""
    try:
        return ",".join(str(v) for v in json.loads((trial_dir / JOB_RECORD).read_text()).get(key, []))
    except (OSError, ValueError, TypeError, AttributeError):
        return ""


def swept_overrides(sweep: Sweep) -> dict[int, list[str]]:
    """Each trial's overrides, keeping only the keys whose values differ between trials."""
    values: dict[str, set[str]] = {}
    for trial in sweep.trials:
        for override in trial.overrides:
            key, _, value = override.partition("=")
            values.setdefault(key, set()).add(value)
    varying = {k for k, v in values.items() if len(v) > 1} or set(values)
    return {t.num: [o for o in t.overrides if o.partition("=")[0] in varying] for t in sweep.trials}


def sweep_status(sweep: Sweep, states: dict[str, tuple[str, str]] | None = None) -> list[TrialStatus]:
    """One row per trial; `states` (slurm.array_task_states of every trial's job) when the caller asked already."""
    if states is None:
        states = slurm.array_task_states([t.job_id for t in sweep.trials if t.job_id])
    shown = swept_overrides(sweep)
    rows = []
    for trial in sweep.trials:
        trial_dir = sweep.path / trial.dir
        state, elapsed = states.get(trial.job_id or "", ("NOT SUBMITTED" if not trial.job_id else "UNKNOWN", ""))
        step, loss, value = _metrics(trial_dir, sweep.objective)
        error = first_error(sweep, trial) if state in TERMINAL_STATES - {"COMPLETED"} else ""
        rows.append(
            TrialStatus(
                trial.num,
                " ".join(shown[trial.num]),
                state,
                job_record_count(trial_dir, "restart_count"),
                job_record_count(trial_dir, "startup_retries"),
                job_record_list(trial_dir, "attempt_nodes"),
                job_record_list(trial_dir, "lost_nodes"),
                step,
                loss,
                value,
                elapsed,
                error,
            )
        )
    return rows


def needs_rerun(status: TrialStatus, trial_dir: Path) -> bool:
    """No result yet, and Slurm will not run it again by itself (failed, cancelled, timed out, lost)."""
    return not (trial_dir / RESULT_FILE).is_file() and status.state not in ACTIVE_STATES


def resume_sweep(sweep: Sweep) -> list[Trial]:
    """Resubmit only the trials that failed or never finished; their checkpoints carry them on."""
    rows = {s.num: s for s in sweep_status(sweep)}
    todo = [t for t in sweep.trials if needs_rerun(rows[t.num], sweep.path / t.dir)]
    if todo:
        submit_trials(sweep, todo, [trial_config(sweep, t) for t in todo])
    return todo


def follow(sweep: Sweep, poll_s: float, render: Callable[[list[TrialStatus]], str]) -> list[TrialStatus]:
    """Block until every trial has ended, re-rendering the status table whenever it changes."""
    return poll_until(
        lambda: sweep_status(sweep), lambda rows: all(r.state in TERMINAL_STATES for r in rows), poll_s, render
    )
