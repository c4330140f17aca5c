"""Benchmark results: each figure next to its baseline from the same run, as JSON and as a Markdown table.

This machine (and any shared login node) is noisy, so absolute numbers drift from run to run; a ratio
against a baseline measured minutes apart by the same processes does not. Every figure therefore names
its baseline, and the table shows both absolute values beside the ratio. Each path is timed in rounds
that alternate it with its baseline; a figure keeps every round's pair, its ratio is the median of the
rounds' ratios (a pair shares the round's drift), and the table shows their spread beside it.
"""

from __future__ import annotations

import json
import platform
import socket
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

SUMMARY_FILE = "summary.md"


@dataclass(frozen=True)
class Figure:
    """One measured quantity, its baseline, and the target the ratio should meet (if there is one).

    Built by `from_rounds`, it holds each alternated round's value and baseline; `value` and `baseline` are
    then their medians, and the ratio, goodness and verdict are medians over the rounds' own ratios.
    """

    benchmark: str
    name: str
    unit: str
    value: float
    baseline_name: str
    baseline: float
    # True when a bigger value is better (bandwidth, samples/s); False for times.
    higher_is_better: bool
    # Minimum acceptable "goodness" ratio (see `goodness`), e.g. 0.95 = within 5% of the baseline.
    target: float | None = None
    # Round i's value and baseline were measured in the same round, one right after the other.
    value_rounds: tuple[float, ...] = ()
    baseline_rounds: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if len(self.value_rounds) != len(self.baseline_rounds):
            raise ValueError(
                f"figure {self.name!r}: {len(self.value_rounds)} rounds of values but {len(self.baseline_rounds)} "
                "of baselines; each round must keep its pair (value, baseline)."
            )

    @staticmethod
    def from_rounds(
        benchmark: str,
        name: str,
        unit: str,
        values: list[float],
        baseline_name: str,
        baselines: list[float],
        higher_is_better: bool,
        target: float | None = None,
    ) -> Figure:
        """A figure from per-round pairs: `values[i]` and `baselines[i]` come from round i."""
        if not values or len(values) != len(baselines):
            raise ValueError(
                f"figure {name!r}: {len(values)} rounds of values and {len(baselines)} of baselines; it needs at "
                "least one round, and each round's pair (value, baseline)."
            )
        return Figure(
            benchmark,
            name,
            unit,
            statistics.median(values),
            baseline_name,
            statistics.median(baselines),
            higher_is_better,
            target,
            tuple(float(v) for v in values),
            tuple(float(b) for b in baselines),
        )

    @property
    def rounds(self) -> int:
        return len(self.value_rounds)

    @staticmethod
    def _ratio(value: float, baseline: float) -> float:
        return value / baseline if baseline else float("nan")

    def _goodness(self, ratio: float) -> float:
        return ratio if self.higher_is_better else (1.0 / ratio if ratio else float("inf"))

    @property
    def round_ratios(self) -> list[float]:
        """hpcml / baseline in each round (one entry, from value and baseline, for a figure without rounds)."""
        if not self.value_rounds:
            return [self._ratio(self.value, self.baseline)]
        return [self._ratio(v, b) for v, b in zip(self.value_rounds, self.baseline_rounds, strict=True)]

    @property
    def round_goodness(self) -> list[float]:
        return [self._goodness(r) for r in self.round_ratios]

    @property
    def ratio(self) -> float:
        """The median round's hpcml / baseline."""
        return statistics.median(self.round_ratios)

    @property
    def goodness(self) -> float:
        """The ratio turned so that 1.0 means as good as the baseline and more means better (median round)."""
        return statistics.median(self.round_goodness)

    @property
    def met(self) -> bool | None:
        """The verdict on the median round, so that one lucky (or unlucky) round does not decide it."""
        return None if self.target is None else self.goodness >= self.target

    def as_dict(self) -> dict[str, Any]:
        ratios, goodness = self.round_ratios, self.round_goodness
        return {
            **asdict(self),
            "ratio": self.ratio,
            "goodness": self.goodness,
            "met": self.met,
            "rounds": self.rounds,
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            "goodness_min": min(goodness),
            "goodness_max": max(goodness),
        }


@dataclass
class BenchResult:
    """One benchmark's output: headline figures plus every raw measurement behind them."""

    benchmark: str
    quick: bool
    params: dict[str, Any]
    figures: list[Figure] = field(default_factory=list)
    measurements: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def write(self, results_dir: Path) -> Path:
        results_dir.mkdir(parents=True, exist_ok=True)
        record = {
            "benchmark": self.benchmark,
            "quick": self.quick,
            "host": socket.gethostname(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "written_at": time.time(),
            "params": self.params,
            "figures": [f.as_dict() for f in self.figures],
            "measurements": self.measurements,
            "notes": self.notes,
        }
        path = results_dir / f"{self.benchmark}.json"
        path.write_text(json.dumps(record, indent=2) + "\n")
        return path


def _fmt(value: float) -> str:
    if value != value:  # NaN
        return "n/a"
    if value == 0 or 0.01 <= abs(value) < 10_000:
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return f"{value:.3g}"


def _verdict(figure: dict[str, Any]) -> str:
    if figure["target"] is None:
        return ""
    return ("met" if figure["met"] else "MISSED") + f" (>= {figure['target']:g})"


def _spread(figure: dict[str, Any]) -> str:
    """min-max of the rounds' ratios and how many rounds; empty for results written before rounds were kept."""
    if not figure.get("rounds"):
        return ""
    return f"{_fmt(figure['ratio_min'])}-{_fmt(figure['ratio_max'])} ({figure['rounds']})"


def markdown_table(records: list[dict[str, Any]]) -> str:
    """The figures of several benchmark records as one Markdown table."""
    lines = [
        "| benchmark | figure | hpcml | baseline | ratio | ratio min-max (rounds) | target |",
        "|---|---|---|---|---|---|---|",
    ]
    for record in records:
        for f in record["figures"]:
            lines.append(
                f"| {f['benchmark']} | {f['name']} | {_fmt(f['value'])} {f['unit']} | "
                f"{f['baseline_name']}: {_fmt(f['baseline'])} {f['unit']} | {_fmt(f['ratio'])} | {_spread(f)} | "
                f"{_verdict(f)} |"
            )
    return "\n".join(lines) + "\n"


def write_summary(results_dir: Path) -> Path:
    """summary.md from every `<benchmark>.json` in `results_dir` (so separate runs of single benchmarks
    still end up in one table)."""
    results_dir.mkdir(parents=True, exist_ok=True)
    records = [json.loads(p.read_text()) for p in sorted(results_dir.glob("*.json"))]
    if not records:
        path = results_dir / SUMMARY_FILE
        path.write_text("# hpcml benchmarks\n\nNo results yet: run `make bench`.\n")
        return path
    modes = sorted({"quick" if r["quick"] else "full" for r in records})
    hosts = sorted({r["host"] for r in records})
    notes = [f"- {r['benchmark']}: {note}" for r in records for note in r.get("notes", [])]
    text = (
        f"# hpcml benchmarks ({', '.join(modes)} mode; host {', '.join(hosts)})\n\n"
        "ratio = hpcml / baseline, both measured in the same run, in rounds that alternate the two: hpcml and "
        "baseline are the medians of the rounds, ratio the median of the rounds' ratios, and min-max their spread. "
        "Targets are on the median ratio turned so that higher is better (a time's target applies to "
        "baseline / hpcml).\n\n" + markdown_table(records)
    )
    if notes:
        text += "\nNotes:\n" + "\n".join(notes) + "\n"
    path = results_dir / SUMMARY_FILE
    path.write_text(text)
    return path


def busbw(algbw: float, ranks: int) -> float:
    """nccl-tests' bus bandwidth for all-reduce: algbw x 2(n-1)/n, comparable across rank counts."""
    return algbw * 2 * (ranks - 1) / ranks
