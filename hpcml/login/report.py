"""`hpcml report`: the best trial by a metric, a summary (CSV and Markdown), and PNG plots."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

from hpcml.login.sweep import Sweep, SweepError, swept_overrides
from hpcml.outputs import METRICS_FILE, read_metrics

REPORT_DIR = "report"


@dataclass
class TrialSummary:
    num: int
    overrides: list[str]
    value: float
    curve: list[tuple[int, float]]


@dataclass
class Report:
    best: TrialSummary
    markdown: str
    files: list[Path]


def _param(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    return key, value


def collect(sweep: Sweep, metric: str) -> list[TrialSummary]:
    found, seen_metrics = [], set()
    shown = swept_overrides(sweep)
    for trial in sweep.trials:
        records = read_metrics(sweep.path / trial.dir / METRICS_FILE)
        for r in records:
            seen_metrics.update(k for k in r if k not in ("step", "time"))
        curve = [(r["step"], float(r[metric])) for r in records if isinstance(r.get(metric), (int, float))]
        if curve:
            found.append(TrialSummary(trial.num, shown[trial.num], curve[-1][1], curve))
    if not found:
        logged = ", ".join(sorted(seen_metrics)) or "none yet"
        raise SweepError(f"no trial logged a metric named {metric!r}; the trials logged: {logged}. Use --metric NAME.")
    return found


def _curves(plt, summaries: list[TrialSummary], metric: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s in summaries:
        steps, values = zip(*s.curve, strict=True)
        ax.plot(steps, values, marker="o" if len(steps) < 3 else None, label=f"{s.num}: {' '.join(s.overrides)}")
    ax.set(xlabel="step", ylabel=metric, title=f"{metric} per trial")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plots(sweep: Sweep, summaries: list[TrialSummary], metric: str, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # no display on a login node
    import matplotlib.pyplot as plt

    files = [_curves(plt, summaries, metric, out / f"curves_{metric}.png")]
    if metric != "loss" and max(len(s.curve) for s in summaries) < 3:
        # A metric logged once per run (test accuracy) makes no curve: show the training loss as well.
        try:
            files.append(_curves(plt, collect(sweep, "loss"), "loss", out / "curves_loss.png"))
        except SweepError:
            pass
    keys = sorted({_param(o)[0] for s in summaries for o in s.overrides})
    for key in keys:
        points = [(dict(map(_param, s.overrides)).get(key), s.value) for s in summaries]
        points = [(x, y) for x, y in points if x is not None]
        try:
            xs = [float(x) for x, _ in points]
            categorical = False
        except ValueError:
            xs, categorical = [x for x, _ in points], True
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.scatter(xs, [y for _, y in points])
        if not categorical and len(set(xs)) > 1 and min(xs) > 0 and max(xs) / min(xs) >= 10:
            ax.set_xscale("log")
        ax.set(xlabel=key, ylabel=f"final {metric}", title=f"final {metric} against {key}")
        fig.tight_layout()
        files.append(out / f"final_{metric}_vs_{key.replace('/', '_')}.png")
        fig.savefig(files[-1], dpi=110)
        plt.close(fig)
    return files


def write_report(sweep: Sweep, metric: str, mode: str) -> Report:
    summaries = collect(sweep, metric)
    best = (max if mode == "max" else min)(summaries, key=lambda s: s.value)
    out = sweep.path / REPORT_DIR
    out.mkdir(exist_ok=True)
    ranked = sorted(summaries, key=lambda s: s.value, reverse=(mode == "max"))
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["rank", "trial", "overrides", metric])
    for i, s in enumerate(ranked, 1):
        writer.writerow([i, s.num, " ".join(s.overrides), s.value])
    (out / "summary.csv").write_text(buffer.getvalue())
    rows = [f"| {i} | {s.num} | `{' '.join(s.overrides)}` | {s.value:.6g} |" for i, s in enumerate(ranked, 1)]
    markdown = "\n".join([f"| rank | trial | overrides | {metric} ({mode}) |", "|---|---|---|---|", *rows]) + "\n"
    (out / "summary.md").write_text(markdown)
    files = [out / "summary.csv", out / "summary.md", *_plots(sweep, summaries, metric, out)]
    return Report(best, markdown, files)
