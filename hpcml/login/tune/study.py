"""A study's directory: what it searches and how (study.json), what each trial became (trials.json), the
config every trial starts from, and Optuna's storage (a journal file here unless the user gave a URL).

    <study>/study.json            StudySpec: written once, at submission
    <study>/template_config.json  the first trial's validated config; a trial is it with the sampled values
    <study>/trials.json           StudyTrial per trial: written by the driver alone, after every change
    <study>/sweep.json            the same trials as a sweep record, so `hpcml status/report` read a study too
    <study>/optuna.journal        Optuna's journal storage (no database server to run)
    <study>/trials/<n>/           trial n's outputs (metrics.jsonl, checkpoints/, result.json)
    <study>/slurm/, driver/       submitit's folders for the trials' jobs and the driver's job
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import optuna

from hpcml.errors import ConfigError
from hpcml.fileio import write_atomically

STUDY_FILE = "study.json"
TRIALS_FILE = "trials.json"
TEMPLATE_CONFIG = "template_config.json"
JOURNAL_FILE = "optuna.journal"
DRIVER_FOLDER = "driver"

SAMPLERS = ("tpe", "cmaes", "random", "grid")
PRUNERS = ("none", "median", "successive_halving", "hyperband")
DIRECTIONS = ("minimize", "maximize")

# What became of a trial, as the driver recorded it (Optuna's own state is in the storage).
RUNNING, COMPLETE, PRUNED, FAILED = "running", "complete", "pruned", "failed"


class StudyError(ConfigError):
    """A study's settings, directory or storage are not usable; the message says why and what to do."""


@dataclass
class StudySpec:
    """Everything the driver needs to run the study, fixed at submission."""

    name: str
    # An Optuna storage URL (e.g. mysql+pymysql://...), or None for the journal file in the study directory.
    storage: str | None
    direction: str
    objective: str
    n_trials: int
    max_parallel: int
    # How often a failed trial is resubmitted (it resumes from its checkpoint) before it is recorded failed.
    max_retries: int
    sampler: str
    seed: int | None
    pruner: str
    pruner_args: dict[str, Any]
    # Seconds between the driver's looks at the trials: one sacct and one squeue each, whatever their number.
    poll_s: float
    # Dotted key -> Optuna distribution as JSON (optuna.distributions.distribution_to_json).
    space: dict[str, str]
    # Unique among studies: the trials' Slurm job names carry it, so a restarted driver finds its jobs.
    token: str
    created: float = field(default_factory=time.time)

    def save(self, study_dir: Path) -> None:
        write_atomically(study_dir / STUDY_FILE, lambda f: f.write(json.dumps(asdict(self), indent=2).encode()))

    @classmethod
    def load(cls, study_dir: Path) -> StudySpec:
        path = Path(study_dir) / STUDY_FILE
        if not path.is_file():
            raise StudyError(
                f"{study_dir} is not a study directory (no {STUDY_FILE}); give the directory that "
                "`python jobs/train.py -m hydra/sweeper=study ...` printed."
            )
        try:
            return cls(**json.loads(path.read_text()))
        except (ValueError, TypeError) as err:
            raise StudyError(f"{path} is unreadable: {err}") from err

    def job_name(self, num: int) -> str:
        """Trial `num`'s Slurm job name."""
        return f"hpcml-study-{self.token}-{num}"

    @property
    def driver_job_name(self) -> str:
        return f"hpcml-study-{self.token}"


def is_study(path: Path) -> bool:
    return (Path(path) / STUDY_FILE).is_file()


@dataclass
class StudyTrial:
    """One Optuna trial and the Slurm job(s) that ran it."""

    num: int  # Optuna's trial number, and the trial's directory under trials/
    params: dict[str, Any]
    trial_id: int  # Optuna's id of it in the storage (what reporting an intermediate value needs)
    job_id: str | None = None
    previous_job_ids: list[str] = field(default_factory=list)
    outcome: str = RUNNING
    value: float | None = None
    # The step of the last intermediate value reported to Optuna (its pruner reads them).
    reported_step: int = -1
    # The step at which the driver asked the trial to stop (pruned), or None.
    prune_requested_at: int | None = None

    @property
    def dir(self) -> str:
        return f"trials/{self.num}"

    @property
    def overrides(self) -> list[str]:
        return [f"{key}={value}" for key, value in self.params.items()]

    @property
    def retries(self) -> int:
        return len(self.previous_job_ids)


def ranked_trials(spec: StudySpec, trials: list[StudyTrial]) -> list[StudyTrial]:
    """The completed trials, best value first in the study's direction (ties in trial order)."""
    done = [t for t in trials if t.outcome == COMPLETE and t.value is not None]
    return sorted(done, key=lambda t: t.value, reverse=spec.direction == "maximize")


def best_trial(spec: StudySpec, trials: list[StudyTrial]) -> StudyTrial | None:
    """The completed trial with the best value in the study's direction; None before any completed."""
    return next(iter(ranked_trials(spec, trials)), None)


def load_trials(study_dir: Path) -> list[StudyTrial]:
    path = Path(study_dir) / TRIALS_FILE
    if not path.is_file():
        return []
    try:
        return [StudyTrial(**t) for t in json.loads(path.read_text())]
    except (ValueError, TypeError) as err:
        raise StudyError(f"{path} is unreadable: {err}") from err


def save_trials(study_dir: Path, trials: list[StudyTrial]) -> None:
    data = json.dumps([asdict(t) for t in trials], indent=2).encode()
    write_atomically(Path(study_dir) / TRIALS_FILE, lambda f: f.write(data))


def open_storage(spec: StudySpec, study_dir: Path) -> optuna.storages.BaseStorage:
    """Optuna's storage for the study: the journal file beside it, or the user's URL, connected now so an
    unreachable one fails before anything is submitted."""
    if spec.storage is None:
        from optuna.storages.journal import JournalFileBackend

        Path(study_dir).mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(Path(study_dir) / JOURNAL_FILE)))
    try:
        return optuna.storages.RDBStorage(spec.storage)
    except Exception as err:  # SQLAlchemy's errors (no driver, refused, bad URL) are many and unrelated
        raise StudyError(
            f"hydra.sweeper.storage={spec.storage}: cannot open it ({type(err).__name__}: {err}). Give a "
            "reachable database URL (its driver installed, e.g. pymysql for mysql+pymysql://), or leave it "
            "unset for a journal file in the study directory."
        ) from err


def make_sampler(spec: StudySpec, seed_offset: int = 0) -> optuna.samplers.BaseSampler:
    """The sampler; `seed_offset` (the trials so far) keeps a restarted driver from replaying the draws
    its first run made."""
    seed = None if spec.seed is None else spec.seed + seed_offset
    if spec.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if spec.sampler == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed)
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if spec.sampler == "grid":
        from hpcml.login.tune.space import grid_values

        params = {k: grid_values(k, d) for k, d in distributions(spec).items()}
        return AskTellGridSampler(params, seed=seed)
    raise StudyError(f"hydra.sweeper.sampler={spec.sampler} is not one of {', '.join(SAMPLERS)}.")


class AskTellGridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler, minus its `study.stop()` once the grid is used up: that works only inside
    `study.optimize`, and under ask/tell it raised from `tell`, before the trial's state was stored. The
    driver stops at n_trials, which the submission keeps within the grid's size."""

    def after_trial(self, study, trial, state, values) -> None:
        return None


def make_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    kinds = {
        "none": optuna.pruners.NopPruner,
        "median": optuna.pruners.MedianPruner,
        "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
        "hyperband": optuna.pruners.HyperbandPruner,
    }
    if spec.pruner not in kinds:
        raise StudyError(f"hydra.sweeper.pruner={spec.pruner} is not one of {', '.join(PRUNERS)}.")
    try:
        return kinds[spec.pruner](**spec.pruner_args)
    except (TypeError, ValueError) as err:
        raise StudyError(
            f"hydra.sweeper.pruner_args={spec.pruner_args} for the {spec.pruner} pruner: {err}. See "
            f"optuna.pruners.{kinds[spec.pruner].__name__} for its arguments."
        ) from err


def distributions(spec: StudySpec) -> dict[str, optuna.distributions.BaseDistribution]:
    from hpcml.login.tune.space import SearchSpace

    return SearchSpace.params_from_json(spec.space)


def load_optuna_study(spec: StudySpec, study_dir: Path, seed_offset: int = 0) -> optuna.Study:
    return optuna.create_study(
        storage=open_storage(spec, study_dir),
        study_name=spec.name,
        direction=spec.direction,
        sampler=make_sampler(spec, seed_offset),
        pruner=make_pruner(spec),
        load_if_exists=True,
    )
