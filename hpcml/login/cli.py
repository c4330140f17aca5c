"""`hpcml`: look after runs and sweeps from the login node.

hpcml status outputs/sweeps/<time> [--watch]     one row per trial: state, restarts, start-up retries, nodes per attempt, lost nodes,
                                                 step, metrics (--watch: refreshed until every trial has
                                                 ended); a single run's outputs/runs/<time> works too
hpcml report outputs/sweeps/<time> --mode max|min [--metric NAME]   NAME: the sweep's launch.objective by default;
                                                 a study needs neither (Optuna's plots, best.yaml)
hpcml resume outputs/sweeps/<time>               resubmit only trials that failed or never finished; for a
                                                 study (hydra/sweeper=study), its driver
hpcml status <study>                             the study's driver, counts, best trial so far, then the table
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from hpcml.errors import HpcmlError, SubmissionError, report_error
from hpcml.login.sweep import TrialStatus, follow, load_sweep, resume_sweep, sweep_status

COLUMNS = (
    "trial",
    "overrides",
    "state",
    "restarts",
    "retries",
    "nodes",
    "lost",
    "step",
    "loss",
    "<objective>",
    "elapsed",
    "error",
)


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4g}"


def render_status(rows: list[TrialStatus], objective: str) -> str:
    """The status table; the objective's column is named after it (test_accuracy, val_loss, ...)."""
    columns = tuple(objective if c == "<objective>" else c for c in COLUMNS)
    cells = [
        (
            str(r.num),
            r.overrides,
            r.state,
            str(r.restarts),
            str(r.startup_retries),
            r.attempt_nodes,
            r.lost_nodes,
            str(r.step),
            _fmt(r.loss),
            _fmt(r.objective),
            r.elapsed,
            r.error[:100],
        )
        for r in rows
    ]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(columns)]
    line = lambda values: "  ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)).rstrip()  # noqa: E731
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.state] = counts.get(r.state, 0) + 1
    summary = ", ".join(f"{n} {state.lower()}" for state, n in sorted(counts.items()))
    return "\n".join([line(columns), *(line(c) for c in cells), f"{len(rows)} trials: {summary}"])


def cmd_status(args: argparse.Namespace) -> int:
    from hpcml.login.tune.study import is_study

    if is_study(args.sweep_dir):
        return study_status(args)
    sweep = load_sweep(args.sweep_dir, single_runs=True)
    if not args.watch:
        print(render_status(sweep_status(sweep), sweep.objective))
        return 0
    # Until every trial has ended: a watch that outlives the sweep would hold the terminal for nothing.
    follow(
        sweep,
        args.interval,
        lambda rows: f"\033[2J\033[H{time.strftime('%H:%M:%S')}  {sweep.path}\n{render_status(rows, sweep.objective)}",
    )
    return 0


def study_status(args: argparse.Namespace) -> int:
    from hpcml.login.tune.status import study_status

    def render() -> tuple[str, bool]:
        status = study_status(args.sweep_dir)
        # Until it has finished, or its driver has ended: then nothing changes until `hpcml resume`.
        return f"{status.header()}\n{render_status(status.rows, status.spec.objective)}", (
            status.finished or status.driver_gone
        )

    text, finished = render()
    if not args.watch:
        print(text)
        return 0
    while True:  # a watch that outlives the study would hold the terminal for nothing
        print(f"\033[2J\033[H{time.strftime('%H:%M:%S')}  {args.sweep_dir}\n{text}", flush=True)
        if finished:
            return 0
        time.sleep(args.interval)
        text, finished = render()


def cmd_report(args: argparse.Namespace) -> int:
    from hpcml.login.tune.study import is_study

    if is_study(args.sweep_dir):
        return study_report(args)
    from hpcml.login.report import write_report

    if args.mode is None:
        # No default: whether more is better depends on the metric (accuracy, or a loss), and a wrong guess
        # would name the worst trial the best. (A study knows its direction.)
        raise SubmissionError("hpcml report: give --mode max (higher is better) or --mode min for a sweep.")
    sweep = load_sweep(args.sweep_dir)
    metric = args.metric or sweep.objective
    report = write_report(sweep, metric, args.mode)
    print(report.markdown)
    print(f"best: trial {report.best.num} ({' '.join(report.best.overrides)}) with {metric}={report.best.value:.6g}")
    print(f"written: {', '.join(str(p) for p in report.files)}")
    return 0


def study_report(args: argparse.Namespace) -> int:
    from hpcml.login.tune.report import write_study_report

    if args.metric is not None or args.mode is not None:
        raise SubmissionError(
            "hpcml report: a study is ranked by its own objective and direction; drop --metric/--mode."
        )
    report = write_study_report(args.sweep_dir)
    print(report.markdown)
    for reason in report.skipped:
        print(f"not drawn: {reason}")
    print(f"best: trial {report.best.num} ({' '.join(report.best.overrides)}) with {report.best.value:.6g}")
    print(f"written: {', '.join(str(p) for p in report.files)}")
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    from hpcml.login.tune.study import is_study

    if is_study(args.sweep_dir):
        from hpcml.login.tune.submit import resume_study

        job_id = resume_study(args.sweep_dir)
        print(f"study driver resubmitted: Slurm job {job_id}; it re-attaches to the trials queued or running")
        return 0
    sweep = load_sweep(args.sweep_dir)
    resubmitted = resume_sweep(sweep)
    if not resubmitted:
        print("nothing to resume: every trial has finished or is still queued or running")
    else:
        print(f"resubmitted {len(resubmitted)} trials: {', '.join(str(t.num) for t in resubmitted)}")
    return 0


def cmd_submit(args: argparse.Namespace, overrides: list[str]) -> int:
    """`python jobs/train.py` under another name, so the whole workflow reads `hpcml ...`."""
    import os

    import hpcml

    # The checkout's entry, wherever the command is run from (Hydra finds conf/ beside it; outputs/ goes
    # under the current directory, as with `python jobs/train.py`).
    entry = Path(hpcml.__file__).resolve().parent.parent / "jobs" / "train.py"
    if not entry.is_file():
        return report_error(
            SubmissionError(
                f"`hpcml submit` needs the hpcml checkout's jobs/train.py, and {entry} does not exist: hpcml is "
                "installed without its checkout. Install it editable (`pip install -e .` in the checkout), or run "
                "`python jobs/train.py ...` from the checkout."
            )
        )
    argv = [sys.executable, str(entry), *(["-m"] if args.multirun else []), *overrides]
    argv += ["launch.dry_run=true"] if args.dry_run else []
    argv += ["launch.wait=true"] if args.wait else []
    os.execv(sys.executable, argv)
    return 0  # not reached


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hpcml", description=__doc__.splitlines()[0])
    verbs = parser.add_subparsers(dest="verb", required=True)
    status = verbs.add_parser("status", help="one row per trial")
    status.add_argument("sweep_dir", type=Path)
    status.add_argument("--watch", action="store_true", help="refresh until every trial has ended (or Ctrl-C)")
    status.add_argument("--interval", type=float, default=5.0, help="seconds between refreshes")
    status.set_defaults(run=cmd_status)
    report = verbs.add_parser("report", help="best trial, summary table, plots")
    report.add_argument("sweep_dir", type=Path)
    report.add_argument(
        "--metric",
        default=None,
        help="a metric the trials logged (metrics.jsonl); default: the sweep's launch.objective",
    )
    report.add_argument(
        "--mode", choices=("max", "min"), default=None, help="a sweep's: max: higher is better; min: lower"
    )
    report.set_defaults(run=cmd_report)
    resume = verbs.add_parser("resume", help="resubmit trials that failed or never finished")
    resume.add_argument("sweep_dir", type=Path)
    resume.set_defaults(run=cmd_resume)
    submit = verbs.add_parser("submit", help="submit a run (-m: a sweep); other arguments are Hydra overrides")
    submit.add_argument("-m", "--multirun", action="store_true", help="a sweep: one job array")
    submit.add_argument("--dry-run", action="store_true", help="print the sbatch script(s), submit nothing")
    submit.add_argument("--wait", action="store_true", help="follow the job(s) to the end")
    submit.set_defaults(run=None)
    args, rest = parser.parse_known_args(argv)
    if args.verb == "submit":
        return cmd_submit(args, rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return args.run(args)
    except HpcmlError as err:
        return report_error(err)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
