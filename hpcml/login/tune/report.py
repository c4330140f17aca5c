"""`hpcml report <study>`: the ranked trials, Optuna's plots (optimisation history, every trial's
intermediate values, parameter importances) as PNG, and best.yaml, a config that reruns the best trial:

    python jobs/train.py --config-dir <study>/report --config-name best
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import optuna
import yaml

from hpcml.login.sweep import TRIAL_CONFIG
from hpcml.login.tune.study import StudyError, StudySpec, StudyTrial, load_optuna_study, load_trials, ranked_trials

REPORT_DIR = "report"
BEST_CONFIG = "best.yaml"


@dataclass
class StudyReport:
    best: StudyTrial
    markdown: str
    files: list[Path]
    skipped: list[str]  # plots Optuna could not draw yet, with the reason


def write_study_report(study_dir: Path) -> StudyReport:
    study_dir = Path(study_dir).resolve()
    spec = StudySpec.load(study_dir)
    trials = load_trials(study_dir)
    ranked = ranked_trials(spec, trials)
    if not ranked:
        raise StudyError(f"no trial of the study in {study_dir} has completed yet; see `hpcml status {study_dir}`.")
    out = study_dir / REPORT_DIR
    out.mkdir(exist_ok=True)
    rows = [f"| {i} | {t.num} | `{' '.join(t.overrides)}` | {t.value:.6g} |" for i, t in enumerate(ranked, 1)]
    others = [f"| - | {t.num} | `{' '.join(t.overrides)}` | {t.outcome} |" for t in trials if t not in ranked]
    markdown = "\n".join(
        [f"| rank | trial | parameters | {spec.objective} ({spec.direction}) |", "|---|---|---|---|", *rows, *others]
    )
    (out / "summary.md").write_text(markdown + "\n")
    files, skipped = _plots(load_optuna_study(spec, study_dir), out)
    files = [out / "summary.md", *files, _best_config(study_dir, spec, ranked[0], out)]
    return StudyReport(ranked[0], markdown, files, skipped)


def _plots(study: optuna.Study, out: Path) -> tuple[list[Path], list[str]]:
    import matplotlib

    matplotlib.use("Agg")  # no display on a login node
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as plots

    files, skipped = [], []
    for name, draw in (
        ("optimization_history", plots.plot_optimization_history),
        ("intermediate_values", plots.plot_intermediate_values),
        ("param_importances", plots.plot_param_importances),
    ):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna marks its matplotlib backend experimental
                ax = draw(study)
        except (ValueError, RuntimeError) as err:  # e.g. importances need two completed trials
            skipped.append(f"{name}: {err}")
            continue
        figure = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
        figure.set_size_inches(8, 5)
        figure.tight_layout()
        files.append(out / f"{name}.png")
        figure.savefig(files[-1], dpi=110)
        plt.close(figure)
    return files, skipped


def _best_config(study_dir: Path, spec: StudySpec, best: StudyTrial, out: Path) -> Path:
    """The best trial's resolved config as a primary config of its own: the schema and hpcml's logging as
    in conf/train.yaml, a fresh output directory (its own would resume the finished trial)."""
    config = json.loads((study_dir / best.dir / TRIAL_CONFIG).read_text())
    config["train"]["output_dir"] = "${hydra:runtime.output_dir}"
    document = {
        "defaults": ["train_schema", {"override hydra/job_logging": "none"}, "_self_"],
        "hydra": {
            "run": {"dir": "outputs/runs/${hpcml_run_stamp:}"},
            "output_subdir": "${hpcml_hydra_subdir:}",
            "job": {"chdir": False},
        },
        **config,
    }
    header = (
        f"# The best trial of study {spec.name}: trial {best.num}, {spec.objective}={best.value:.6g}\n"
        f"# ({' '.join(best.overrides)}). Rerun it, with any override added:\n"
        f"#   python jobs/train.py --config-dir {out} --config-name best\n"
    )
    path = out / BEST_CONFIG
    path.write_text(header + yaml.safe_dump(document, sort_keys=False))
    return path
