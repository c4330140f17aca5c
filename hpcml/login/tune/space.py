"""A study's search space, written in Hydra's sweep syntax, as Optuna distributions.

    optim.lr=tag(log,interval(1e-4,1e-1))    FloatDistribution(1e-4, 1e-1, log=True)
    train.steps=range(100,400,100)           IntDistribution(100, 300, step=100)   (stop excluded, as Hydra's)
    model.hidden=choice(64,128) or =64,128   CategoricalDistribution([64, 128])
    optim.momentum=interval(0.8,0.99)        FloatDistribution(0.8, 0.99)

Everything here is checked on the login node, before a study is submitted: an empty choice, an interval
whose low end is above its high end, a log scale over non-positive values, a tag it does not know.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from hydra.errors import HydraException
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
    distribution_to_json,
    json_to_distribution,
)

from hpcml.errors import ConfigError

KNOWN_TAGS = {"log"}


class SearchSpaceError(ConfigError):
    """A swept key or its values cannot be searched; the message names the key and the fix."""


@dataclass
class SearchSpace:
    """What the sampler draws (dotted key -> distribution), and the plain overrides every trial shares."""

    params: dict[str, BaseDistribution]
    fixed: list[str]

    def to_json(self) -> dict[str, str]:
        return {key: distribution_to_json(d) for key, d in self.params.items()}

    @staticmethod
    def params_from_json(data: dict[str, str]) -> dict[str, BaseDistribution]:
        return {key: json_to_distribution(d) for key, d in data.items()}

    def grid(self) -> dict[str, list]:
        """Every value of every key, for Optuna's GridSampler: a continuous interval has no grid."""
        return {key: grid_values(key, d) for key, d in self.params.items()}

    def corners(self) -> list[dict[str, object]]:
        """Values to check against the config before submitting: each choice, and both ends of each range."""
        checks = []
        for key, d in self.params.items():
            values = d.choices if isinstance(d, CategoricalDistribution) else (d.low, d.high)
            checks += [{key: v} for v in values]
        return checks

    def first_values(self) -> dict[str, object]:
        """One value per key (the first choice, the low end): the trial composed and validated at submit time."""
        return {k: d.choices[0] if isinstance(d, CategoricalDistribution) else d.low for k, d in self.params.items()}


def grid_values(key: str, d: BaseDistribution) -> list:
    if isinstance(d, CategoricalDistribution):
        return list(d.choices)
    if isinstance(d, IntDistribution):
        return list(range(d.low, d.high + 1, d.step))
    if isinstance(d, FloatDistribution) and d.step is not None:
        count = round((d.high - d.low) / d.step) + 1
        return [d.low + i * d.step for i in range(count)]
    raise SearchSpaceError(
        f"{key}: the grid sampler needs a finite set of values, and an interval has none; give "
        f"choice(...) or range(...) for {key}, or use another sampler (hydra.sweeper.sampler=tpe)."
    )


def parse_search_space(arguments: list[str]) -> SearchSpace:
    """The sweep overrides of a `-m` command line as distributions; every other override stays fixed."""
    try:
        overrides = OverridesParser.create().parse_overrides(list(arguments))
    except HydraException as err:
        raise SearchSpaceError(f"cannot parse the search space: {err}") from err
    params: dict[str, BaseDistribution] = {}
    fixed = []
    for override in overrides:
        if not override.is_sweep_override():
            fixed.append(override.input_line)
            continue
        key = override.key_or_group
        if override.is_hydra_override() or override.is_add() or override.is_force_add() or override.is_delete():
            raise SearchSpaceError(
                f"{override.input_line}: a study searches values of keys the config has; give it as {key}=..."
                " without +, ++ or ~, and not under hydra."
            )
        if key in params:
            raise SearchSpaceError(f"{key} is swept twice; give it once.")
        params[key] = to_distribution(override)
    if not params:
        raise SearchSpaceError(
            "the study has nothing to search: give at least one key a range of values, e.g. "
            "'optim.lr=tag(log,interval(1e-4,1e-1))' or model.hidden=64,128."
        )
    return SearchSpace(params, fixed)


def to_distribution(override: Override) -> BaseDistribution:
    key, sweep = override.key_or_group, override.value()
    tags = set(getattr(sweep, "tags", ()) or ())
    if unknown := tags - KNOWN_TAGS:
        raise SearchSpaceError(
            f"{override.input_line}: unknown tag {', '.join(sorted(unknown))}; the one tag a study reads is "
            "log, as in tag(log,interval(1e-4,1e-1))."
        )
    log = "log" in tags
    if isinstance(sweep, ChoiceSweep):
        return _choice(key, list(sweep.list), log)
    if isinstance(sweep, RangeSweep):
        return _range(key, sweep, log)
    if isinstance(sweep, IntervalSweep):
        return _interval(key, sweep.start, sweep.end, log)
    raise SearchSpaceError(
        f"{override.input_line}: a study cannot search this kind of sweep; use choice(...), range(...) or "
        "interval(...)."
    )


def _choice(key: str, values: list, log: bool) -> CategoricalDistribution:
    if log:
        raise SearchSpaceError(f"{key}: tag(log, ...) applies to range() or interval(), not to a choice.")
    if not values:
        raise SearchSpaceError(f"{key}: the choice is empty; give at least one value, e.g. {key}=choice(1,2).")
    for value in values:
        if value is not None and not isinstance(value, bool | int | float | str):
            raise SearchSpaceError(
                f"{key}: choice values must be numbers, strings, booleans or null; {value!r} is not."
            )
    if len(set(map(repr, values))) != len(values):
        raise SearchSpaceError(f"{key}: the choice lists a value twice; give each value once.")
    return CategoricalDistribution(values)


def _range(key: str, sweep: RangeSweep, log: bool) -> BaseDistribution:
    start, stop, step = sweep.start, sweep.stop, sweep.step
    if step <= 0:
        raise SearchSpaceError(f"{key}: range({start},{stop},{step}) needs a positive step.")
    if stop <= start:
        raise SearchSpaceError(
            f"{key}: range({start},{stop}) is empty (the stop is excluded, as in Python); give a stop above {start}."
        )
    # The stop is excluded; 1e-9 keeps float error (2.1 / 0.3 = 7.000000000000001) from letting it in.
    count = math.ceil((stop - start) / step - 1e-9)
    # In decimal, as Optuna checks that a step divides the range: 6 * 0.3 in binary is 1.7999999999999998.
    last = type(start + step)(Decimal(str(start)) + (count - 1) * Decimal(str(step)))
    if all(isinstance(v, int) for v in (start, stop, step)):
        if log and step != 1:
            raise SearchSpaceError(f"{key}: a log-scaled range needs step 1 (Optuna draws any integer in it).")
        _check_log(key, start, log)
        return IntDistribution(start, last, log=log, step=step)
    if log:
        raise SearchSpaceError(f"{key}: a log-scaled float range has no fixed step; use tag(log,interval(...)).")
    return FloatDistribution(float(start), float(last), step=float(step))


def _interval(key: str, low: float, high: float, log: bool) -> BaseDistribution:
    if low > high:
        raise SearchSpaceError(f"{key}: interval({low},{high}) has its low end above its high end; swap them.")
    _check_log(key, low, log)
    return FloatDistribution(float(low), float(high), log=log)  # Hydra's interval() is always float: ints use range()


def _check_log(key: str, low: float, log: bool) -> None:
    if log and low <= 0:
        raise SearchSpaceError(f"{key}: a log scale needs values above 0, and the low end is {low}.")
