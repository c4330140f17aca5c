"""`python jobs/train.py -m ...` -> validated trials -> hpcml.login.sweep.submit_trials (one array per resource shape).

Every trial is composed and validated before anything is submitted, so an unknown swept key or a bad
value fails the whole sweep on the login node with nothing left half-submitted. Trials that do not
submit (cluster.submit=false) run one after another right here, as Hydra's basic launcher would.

Composing a config with Hydra is slow (defaults tree, schema, merges: docs/PERFORMANCE.md has the
figures), and a 1000-trial sweep spent minutes on it. Trials that differ from the first only in the values of plain keys (`optim.lr=...`, the
usual sweep) are derived from the first trial instead; anything else (config groups, +/++/~ overrides,
dict values, hydra.* keys) is composed by Hydra as before. Two ways to derive, fastest first:
- from the first trial's validated config: the changed values are set and checked section by section
  (hpcml.config.with_values, the fastest); only where no task interpolation reads a changed key (the
  MLP's ${data.input_dim} may stay, a swept data.input_dim may not) and the subdir reads only hydra.* keys;
- otherwise from its composed config, applying the overrides exactly as Hydra's composition applies such
  an override (OmegaConf.update, merge=True), then validating the whole.
A value either way rejects goes back to Hydra's composition, whose error message the user then sees.

JobReturn.cfg is left None: neither Hydra's sweepers nor Optuna's read it, and a DictConfig per trial
costs more than deriving the trial.

No `from __future__ import annotations` here: Hydra's plugin scan executes this module outside
sys.modules, where dataclasses cannot resolve string annotations.
"""

import copy
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from hydra._internal.config_loader_impl import get_overrides_dirname  # hydra-core is pinned to 1.3.x
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra.plugins.launcher import Launcher
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from hpcml.config import TrainJobConfig, validate, with_values
from hpcml.errors import ConfigError, HpcmlError, report_error


@dataclass
class HpcmlLauncherConf:
    _target_: str = "hydra_plugins.hpcml_launcher.launcher.HpcmlLauncher"


ConfigStore.instance().store(group="hydra/launcher", name="hpcml", node=HpcmlLauncherConf, provider="hpcml")


_ABSENT = object()


def _is_plain_value_change(override: Override, template: DictConfig) -> bool:
    """`key=value` on an existing leaf of the task config: the one kind of override that can be applied
    to an already composed config with the same result as composing anew."""
    if override.is_delete() or override.is_add() or override.is_force_add() or override.package is not None:
        return False
    if override.is_hydra_override() or override.is_sweep_override() or isinstance(override.value(), dict):
        return False
    node = OmegaConf.select(template, override.key_or_group, default=_ABSENT, throw_on_missing=False)
    return node is not _ABSENT and not OmegaConf.is_config(node)  # a container here means a config group


def changed_values(
    template: DictConfig, template_overrides: list[Override], overrides: list[Override]
) -> list[Override] | None:
    """The overrides in which a trial differs from the template's, if they only give plain keys new values;
    None unless both have the same keys in the same order and those that differ are plain values."""
    if [o.key_or_group for o in overrides] != [o.key_or_group for o in template_overrides]:
        return None
    # Overrides the first trial had too (cluster=local, say) are in the template already, whatever their kind.
    changed = [o for o, t in zip(overrides, template_overrides, strict=True) if o.input_line != t.input_line]
    if not all(_is_plain_value_change(o, template) for o in changed):
        return None
    return changed


def set_job_fields(cfg: DictConfig, overrides: list[Override]) -> None:
    """The hydra.* fields Hydra's composition derives from a trial's overrides."""
    job = cfg.hydra.job
    with open_dict(cfg.hydra):
        cfg.hydra.overrides.task = [o.input_line for o in overrides]
        job.override_dirname = get_overrides_dirname(
            overrides=overrides,
            kv_sep=job.config.override_dirname.kv_sep,
            item_sep=job.config.override_dirname.item_sep,
            exclude_keys=list(job.config.override_dirname.exclude_keys),
        )


def derive_trial_config(
    template: DictConfig, template_overrides: list[Override], overrides: list[Override]
) -> DictConfig | None:
    """The config Hydra would compose for `overrides`, from the one it composed for `template_overrides`;
    None unless both have the same keys in the same order and those that differ are plain values."""
    changed = changed_values(template, template_overrides, overrides)
    if changed is None:
        return None
    cfg = copy.deepcopy(template)
    try:
        for override in changed:
            OmegaConf.update(cfg, override.key_or_group, override.value(), merge=True)
    except OmegaConfBaseException:
        return None  # Hydra's own composition reports it, with its message
    set_job_fields(cfg, overrides)
    return cfg


# Keys the launcher sets for every trial: an interpolation there is replaced before anything reads it.
_SET_BY_LAUNCHER = {"train.output_dir"}


def _leaves(node: object, prefix: str = "") -> Iterator[tuple[str, object]]:
    """(dotted key, raw value) of every leaf of a plain container, interpolations unresolved."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else None
    if items is None:
        yield prefix.rstrip("."), node
        return
    for key, child in items:
        yield from _leaves(child, f"{prefix}{key}.")


def _references(value: object) -> list[str] | None:
    """The keys a plain interpolation reads (`${a.b}`, or several inside a string); None for a resolver
    (`${now:...}`), a relative key or a nested interpolation, which could read anything."""
    if not isinstance(value, str) or "${" not in value:
        return []
    refs = re.findall(r"\$\{([^}]*)\}", value)
    if any(not re.fullmatch(r"[A-Za-z_][\w]*(\.[\w]+)*", ref) for ref in refs):
        return None
    return refs


def _overlaps(key: str, other: str) -> bool:
    return key == other or key.startswith(f"{other}.") or other.startswith(f"{key}.")


def interpolation_sources(composed: DictConfig) -> set[str] | None:
    """Every key that some task value's interpolation reads, following chains (the MLP's input_dim reads
    data.input_dim); None where one could read anything (a resolver, a relative key)."""
    task = OmegaConf.to_container(OmegaConf.masked_copy(composed, [k for k in composed if k != "hydra"]), resolve=False)
    leaves = dict(_leaves(task))
    pending = [key for key, value in leaves.items() if key not in _SET_BY_LAUNCHER and _references(value) != []]
    sources: set[str] = set()
    seen = set(pending)
    while pending:
        refs = _references(leaves[pending.pop()])
        if refs is None:
            return None
        for ref in refs:
            sources.add(ref)
            # A value it reads may be an interpolation itself.
            for key, value in leaves.items():
                if key not in seen and _overlaps(key, ref) and _references(value) != []:
                    seen.add(key)
                    pending.append(key)
    return sources


def values_alone_decide(composed: DictConfig) -> set[str] | None:
    """The keys a trial may not change if its new values alone are to describe it: those the task's
    interpolations read (a validated config has them resolved). None where no trial can be derived that
    way: an interpolation could read anything, or the trial's subdir reads more than hydra.* keys (plain
    interpolations, no resolvers)."""
    subdir = str(OmegaConf.to_container(composed.hydra.sweep, resolve=False)["subdir"])
    if not all(re.fullmatch(r"hydra\.[\w.]+", ref) for ref in re.findall(r"\$\{([^}]*)\}", subdir)):
        return None
    return interpolation_sources(composed)


@dataclass
class TrialTemplate:
    """The first trial as Hydra composed it, what later trials are derived from."""

    composed: DictConfig  # the whole config, hydra node included
    overrides: list[Override]
    # Its validated task config and a copy of its hydra node for resolving each trial's subdir, where the
    # new values alone can decide a trial (values_alone_decide); None where not, or until validated.
    config: TrainJobConfig | None = None
    hydra_scratch: DictConfig | None = None
    # Keys a trial derived from `config` may not change: the task's interpolations read them.
    read_by_interpolations: frozenset[str] = frozenset()


class HpcmlLauncher(Launcher):
    def __init__(self) -> None:
        self.config: DictConfig | None = None
        self.hydra_context = None
        self.task_function = None
        self._template: TrialTemplate | None = None
        # How many trials were derived from the first's validated config (the fastest way).
        self.derived_from_validated = 0

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def validated_trial(self, overrides: list[str], num: int) -> tuple[TrainJobConfig, Path]:
        """Trial `num`'s validated config and its directory."""
        parsed = OverridesParser.create().parse_overrides(overrides)
        derived = self._derive_validated(parsed, num)
        if derived is not None:
            return derived
        first = self._template is None
        task, trial_dir = self._trial_config(overrides, parsed, num)
        config = validate(task)
        template = self._template
        if first and template is not None and (sources := values_alone_decide(template.composed)) is not None:
            template.config = config
            template.hydra_scratch = copy.deepcopy(OmegaConf.masked_copy(template.composed, ["hydra"]))
            template.read_by_interpolations = frozenset(sources)
        return config, trial_dir

    @property
    def first_trial_composed(self) -> DictConfig:
        """The first trial's config as Hydra composed it, hydra node included (after a validated_trial())."""
        if self._template is None:
            raise RuntimeError("no trial was composed yet: call validated_trial() first")
        return self._template.composed

    def _derive_validated(self, parsed: list[Override], num: int) -> tuple[TrainJobConfig, Path] | None:
        template = self._template
        if template is None or template.config is None or template.hydra_scratch is None:
            return None
        changed = changed_values(template.composed, template.overrides, parsed)
        if changed is None or any(
            _overlaps(o.key_or_group, read) for o in changed for read in template.read_by_interpolations
        ):
            return None
        scratch = template.hydra_scratch
        set_job_fields(scratch, parsed)
        with open_dict(scratch.hydra.job):
            scratch.hydra.job.num = num
            scratch.hydra.job.id = f"trial_{num}"
        trial_dir = self._sweep_dir() / str(scratch.hydra.sweep.subdir)
        values = {o.key_or_group: o.value() for o in changed}
        values["train.output_dir"] = str(trial_dir.resolve())
        try:
            derived = with_values(template.config, values), trial_dir
            self.derived_from_validated += 1
            return derived
        except ConfigError:
            return None  # composed by Hydra and validated whole, the trial gets the usual error message

    def _sweep_dir(self) -> Path:
        return Path(str(self.config.hydra.sweep.dir))

    def _compose(self, overrides: list[str], parsed: list[Override]) -> DictConfig:
        template = self._template
        sweep_config = derive_trial_config(template.composed, template.overrides, parsed) if template else None
        if sweep_config is None:
            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
            if template is None:
                self._template = TrialTemplate(sweep_config, parsed)
        else:
            OmegaConf.copy_cache(from_config=self.config, to_config=sweep_config)
        return sweep_config

    def _trial_config(self, overrides: list[str], parsed: list[Override], num: int) -> tuple[DictConfig, Path]:
        sweep_config = self._compose(overrides, parsed)
        with open_dict(sweep_config.hydra.job):
            sweep_config.hydra.job.num = num
            sweep_config.hydra.job.id = f"trial_{num}"
        trial_dir = self._sweep_dir() / str(sweep_config.hydra.sweep.subdir)
        task = OmegaConf.masked_copy(sweep_config, [k for k in sweep_config if k != "hydra"])
        task.train.output_dir = str(trial_dir.resolve())
        return task, trial_dir

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        try:
            return self._launch(job_overrides, initial_job_idx)
        except HpcmlError as err:
            # The same one-line error as a single run gets, not a traceback; nothing was submitted.
            sys.exit(report_error(err))

    def _launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from hpcml.login.sweep import SweepError, Trial, open_sweep, submit_trials, write_trial_files

        if not job_overrides:
            raise SweepError("the sweep is empty: no trial to launch. Give values to sweep, e.g. optim.lr=0.01,0.1")
        sweep_dir = self._sweep_dir().resolve()
        trials, configs = [], []
        for offset, overrides in enumerate(job_overrides):
            num = initial_job_idx + offset
            try:
                config, trial_dir = self.validated_trial(list(overrides), num)
            except ConfigError as err:
                raise ConfigError(f"trial {num} ({' '.join(filter_overrides(overrides))}): {err}") from err
            configs.append(config)
            trials.append(
                Trial(num, list(filter_overrides(overrides)), str(trial_dir.resolve().relative_to(sweep_dir)))
            )
        if not configs[0].cluster.submit:
            return self._run_here(job_overrides, initial_job_idx)
        sweep = open_sweep(sweep_dir, trials, configs[0].launch.objective)
        dry_run = configs[0].launch.dry_run
        if not dry_run:
            sweep_dir.mkdir(parents=True, exist_ok=True)
            for trial, cfg in zip(trials, configs, strict=True):
                write_trial_files(sweep_dir, trial, cfg)
            sweep.save()
        scripts = submit_trials(sweep, trials, configs, dry_run=dry_run)
        submitted = [JobReturn(overrides=list(o), status=JobStatus.COMPLETED) for o in job_overrides]
        if dry_run:
            for script in scripts:
                print(script)
            return submitted
        print(f"sweep of {len(sweep.trials)} trials: {sweep_dir}")
        print(f"  follow: hpcml status {sweep_dir} --watch")
        # Hydra's basic sweeper needs nothing back; an optimizing one (Optuna) needs each trial's objective.
        from hpcml.outputs import sweeper_needs_objective

        needs_values = sweeper_needs_objective(str(self.config.hydra.sweeper.get("_target_", "")))
        if not (configs[0].launch.wait or needs_values):
            return submitted
        from hpcml.login.cli import render_status
        from hpcml.login.sweep import follow

        follow(sweep, configs[0].launch.poll_s, lambda rows: render_status(rows, sweep.objective))
        return [
            self._outcome(o, sweep_dir / trial.dir, cfg, needs_values)
            for o, trial, cfg in zip(job_overrides, trials, configs, strict=True)
        ]

    @staticmethod
    def _outcome(overrides, trial_dir: Path, cfg: TrainJobConfig, needs_value: bool) -> JobReturn:
        from hpcml.login.sweep import SweepError
        from hpcml.outputs import RESULT_FILE, read_objective

        if not (trial_dir / RESULT_FILE).is_file():
            error = SweepError(f"trial in {trial_dir} ended without a result; see `hpcml status`")
            return JobReturn(overrides=list(overrides), status=JobStatus.FAILED, _return_value=error)
        value = read_objective(trial_dir, cfg.launch.objective) if needs_value else None
        return JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED, _return_value=value)

    def _run_here(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from hydra._internal.core_plugins.basic_launcher import BasicLauncher

        basic = BasicLauncher()
        basic.setup(hydra_context=self.hydra_context, task_function=self.task_function, config=self.config)
        return basic.launch(job_overrides, initial_job_idx)
