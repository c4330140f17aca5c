"""`python jobs/train.py -m hydra/sweeper=study ...`: an Optuna study that runs on the cluster, not here.

    python jobs/train.py -m cluster=local hydra/sweeper=study hydra.sweeper.direction=maximize \\
        hydra.sweeper.n_trials=32 hydra.sweeper.max_parallel=4 hydra.sweeper.pruner=median \\
        train.eval_every_steps=50 'optim.lr=tag(log,interval(1e-4,1e-1))' model.hidden=64,128,256

Checks the search space (hpcml.login.tune.space) and the config of a first trial, with every choice and both ends
of every range set in it, then submits the study's driver (hpcml.login.tune.driver) as one small Slurm job and
returns: the driver asks Optuna for trials and submits each as its own job. Nothing waits on the login node.

No `from __future__ import annotations` here: see launcher.py.
"""

import sys
import uuid
from dataclasses import dataclass, field
from difflib import get_close_matches
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper
from omegaconf import DictConfig, OmegaConf

from hpcml.errors import ConfigError, HpcmlError, report_error


@dataclass
class StudySweeperConf:
    _target_: str = "hydra_plugins.hpcml_launcher.study_sweeper.StudySweeper"
    # Whether launch.objective is to be made large (accuracy) or small (a loss). No default: a wrong guess
    # would search for the worst settings.
    direction: str | None = None
    n_trials: int = 16
    # Trials in flight at once; a new one starts as soon as any ends.
    max_parallel: int = 4
    sampler: str = "tpe"  # tpe | cmaes | random | grid
    seed: int | None = None
    pruner: str = "none"  # none | median | successive_halving | hyperband (needs train.eval_every_steps)
    # Keyword arguments of the pruner's Optuna class, e.g. {n_startup_trials: 4, n_warmup_steps: 100}.
    pruner_args: dict[str, Any] = field(default_factory=dict)
    # An Optuna storage URL (mysql+pymysql://user:pw@host/db); unset: a journal file in the study directory.
    storage: str | None = None
    # Unset: the study directory's name.
    study_name: str | None = None
    # Resubmissions of a trial whose job failed (it resumes from its checkpoint) before it counts as failed.
    max_retries: int = 1
    # Seconds between the driver's looks at its trials.
    poll_s: float = 10.0
    # The driver's job: minutes per attempt (it requeues itself at the limit and carries on), and memory.
    driver_time_min: int = 240
    driver_mem_gb: float | None = None


ConfigStore.instance().store(group="hydra/sweeper", name="study", node=StudySweeperConf, provider="hpcml")


class StudySweeper(Sweeper):
    def __init__(self, **settings: Any) -> None:
        self.settings = settings
        self.config: DictConfig | None = None
        self.hydra_context = None
        self.task_function = None

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        self.hydra_context = hydra_context
        self.task_function = task_function
        self.config = config

    def sweep(self, arguments: list[str]) -> Any:
        try:
            return self._sweep(arguments)
        except HpcmlError as err:
            sys.exit(report_error(err))  # one line naming the problem and the fix; nothing was submitted

    def _sweep(self, arguments: list[str]) -> None:
        from hpcml.login.tune.space import parse_search_space
        from hpcml.login.tune.study import StudySpec
        from hpcml.login.tune.submit import DriverResources, submit_study

        from .launcher import HpcmlLauncher

        s = self.settings
        check_settings(s)
        space = parse_search_space(arguments)
        launcher = HpcmlLauncher()
        launcher.setup(hydra_context=self.hydra_context, task_function=self.task_function, config=self.config)
        first = [*space.fixed, *(f"{k}={v}" for k, v in space.first_values().items())]
        try:
            template, _ = launcher.validated_trial(first, 0)
        except ConfigError as err:
            raise ConfigError(f"the study's first trial ({' '.join(first)}): {err}") from err
        check_keys_are_plain_values(space.params, launcher.first_trial_composed)
        check_values(space, template)
        if not template.cluster.submit:
            raise ConfigError(
                "a study runs each trial as a Slurm job, and cluster.submit is false: choose a cluster "
                "(cluster=local, or your site's)."
            )
        if s["pruner"] != "none" and not template.train.eval_every_steps:
            raise ConfigError(
                f"hydra.sweeper.pruner={s['pruner']} judges trials by the values they report while training, and "
                "train.eval_every_steps=0 reports none: set it (e.g. train.eval_every_steps=50)."
            )
        if s["sampler"] == "grid":
            points = 1
            for values in space.grid().values():
                points *= len(values)
            if s["n_trials"] > points:
                raise ConfigError(
                    f"the grid has {points} points and hydra.sweeper.n_trials={s['n_trials']}: lower n_trials to "
                    f"{points} at most."
                )
        study_dir = Path(str(self.config.hydra.sweep.dir)).resolve()
        spec = StudySpec(
            name=s["study_name"] or study_dir.name,
            storage=s["storage"],
            direction=s["direction"],
            objective=template.launch.objective,
            n_trials=s["n_trials"],
            max_parallel=s["max_parallel"],
            max_retries=s["max_retries"],
            sampler=s["sampler"],
            seed=s["seed"],
            pruner=s["pruner"],
            pruner_args=dict(s["pruner_args"]),
            poll_s=s["poll_s"],
            space=space.to_json(),
            token=uuid.uuid4().hex[:10],
        )
        resources = DriverResources(time_min=s["driver_time_min"], mem_gb=s["driver_mem_gb"])
        job_id = submit_study(spec, study_dir, template, resources, dry_run=template.launch.dry_run)
        if job_id is None:
            return
        print(
            f"study {spec.name}: {spec.n_trials} trials, up to {spec.max_parallel} at a time, {spec.direction} "
            f"{spec.objective} ({spec.sampler} sampler, {spec.pruner} pruner)\n"
            f"  directory: {study_dir}\n"
            f"  driver:    Slurm job {job_id} (one CPU); it submits the trials, nothing runs here\n"
            f"  follow:    hpcml status {study_dir} --watch\n"
            f"  if the driver is cancelled: hpcml resume {study_dir}"
        )


def check_settings(s: dict[str, Any]) -> None:
    from hpcml.login.tune.study import DIRECTIONS, PRUNERS, SAMPLERS

    if s["direction"] not in DIRECTIONS:
        raise ConfigError(
            f"hydra.sweeper.direction={s['direction']}: say whether launch.objective is to be made large or small, "
            "hydra.sweeper.direction=maximize (an accuracy) or minimize (a loss)."
        )
    for key, allowed in (("sampler", SAMPLERS), ("pruner", PRUNERS)):
        if s[key] not in allowed:
            raise ConfigError(f"hydra.sweeper.{key}={s[key]} is not one of {', '.join(allowed)}.")
    for key in ("n_trials", "max_parallel"):
        if s[key] < 1:
            raise ConfigError(f"hydra.sweeper.{key}={s[key]} must be 1 or more.")
    for key, low, bound in (("max_retries", 0, ">= 0"), ("driver_time_min", 1, ">= 1"), ("seed", 0, ">= 0")):
        if s[key] is not None and s[key] < low:
            raise ConfigError(f"hydra.sweeper.{key}={s[key]} must be {bound}.")
    if s["poll_s"] <= 0:
        raise ConfigError(f"hydra.sweeper.poll_s={s['poll_s']} must be above 0 (seconds between the driver's looks).")


_ABSENT = object()


def check_keys_are_plain_values(params: dict[str, Any], composed: DictConfig) -> None:
    """A study sets values of keys the config has: not config groups, not keys that are not there, not keys
    another value reads through an interpolation (setting one in a validated config would not reach it)."""
    from .launcher import _overlaps, interpolation_sources

    task = OmegaConf.masked_copy(composed, [k for k in composed if k != "hydra"])
    read = interpolation_sources(composed) or set()
    for key in params:
        node = OmegaConf.select(task, key, default=_ABSENT, throw_on_missing=False)
        if node is _ABSENT:
            leaves = [k for k, _ in _dotted_leaves(OmegaConf.to_container(task, resolve=False))]
            near = get_close_matches(key, leaves, n=3)
            hint = f" Did you mean {' or '.join(near)}?" if near else ""
            raise ConfigError(f"{key} is not a key of the config, so a study cannot search it.{hint}")
        if OmegaConf.is_config(node):
            raise ConfigError(
                f"{key} is a config group or section, and a study searches values of plain keys (e.g. "
                f"{key}.<field>=...). To compare choices of a group, run one study per choice, or a grid sweep "
                f"({key}=a,b without hydra/sweeper=study)."
            )
        if any(_overlaps(key, source) for source in read):
            raise ConfigError(
                f"{key} is read elsewhere in the config through an interpolation (${{{key}}}), which a trial's "
                "value would not reach; search the keys that read it instead, or a grid sweep, which composes "
                "each trial."
            )


def _dotted_leaves(node: Any, prefix: str = "") -> list[tuple]:
    if isinstance(node, dict):
        return [leaf for k, v in node.items() for leaf in _dotted_leaves(v, f"{prefix}{k}.")]
    return [(prefix.rstrip("."), node)]


def check_values(space: Any, template: Any) -> None:
    """Every choice and both ends of every range, set in the first trial's config and checked as a trial's is."""
    from hpcml.config import with_values

    for values in space.corners():
        try:
            with_values(template, values)
        except ConfigError as err:
            ((key, value),) = values.items()
            raise ConfigError(f"the search space gives {key}={value}, which the config refuses: {err}") from err
