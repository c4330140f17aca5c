"""Benchmark results: each figure next to its baseline from the same run, as JSON and as a Markdown table.

This machine (and any shared login node) is noisy, so absolute numbers drift from run to run; a ratio
against a baseline measured minutes apart by the same processes does not. Every figure therefore names
its baseline, and the table shows both absolute values beside the ratio.
"""

from __future__ import annotations

import json
import platform
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

SUMMARY_FILE = "summary.md"


@dataclass(frozen=True)
class Figure:
    """One measured quantity, its baseline, and the target the ratio should meet (if there is one)."""

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

    @property
    def ratio(self) -> float:
        return self.value / self.baseline if self.baseline else float("nan")

    @property
    def goodness(self) -> float:
        """The ratio turned so that 1.0 means as good as the baseline and more means better."""
        r = self.ratio
        return r if self.higher_is_better else (1.0 / r if r else float("inf"))

    @property
    def met(self) -> bool | None:
        return None if self.target is None else self.goodness >= self.target

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio, "goodness": self.goodness, "met": self.met}


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


def markdown_table(records: list[dict[str, Any]]) -> str:
    """The figures of several benchmark records as one Markdown table."""
    lines = [
        "| benchmark | figure | hpcml | baseline | ratio | target |",
        "|---|---|---|---|---|---|",
    ]
    for record in records:
        for f in record["figures"]:
            lines.append(
                f"| {f['benchmark']} | {f['name']} | {_fmt(f['value'])} {f['unit']} | "
                f"{f['baseline_name']}: {_fmt(f['baseline'])} {f['unit']} | {_fmt(f['ratio'])} | {_verdict(f)} |"
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
        "ratio = hpcml / baseline, both measured in the same run. Targets are on the ratio turned so that "
        "higher is better (a time's target applies to baseline / hpcml).\n\n" + markdown_table(records)
    )
    if notes:
        text += "\nNotes:\n" + "\n".join(notes) + "\n"
    path = results_dir / SUMMARY_FILE
    path.write_text(text)
    return path


def busbw(algbw: float, ranks: int) -> float:
    """nccl-tests' bus bandwidth for all-reduce: algbw x 2(n-1)/n, comparable across rank counts."""
    return algbw * 2 * (ranks - 1) / ranks
