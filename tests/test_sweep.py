"""Sweep bookkeeping, status, report and the launcher's refusals, without a cluster."""

import json
import subprocess

import pytest
from helpers import PYTHON, ROOT, TRAIN, mpi_env

from hpcml.config import ClusterConfig, TrainJobConfig
from hpcml.login import sweep as sw
from hpcml.login.cli import main as cli_main
from hpcml.login.cli import render_status
from hpcml.login.report import write_report


def make_sweep(tmp_path, finals: dict[int, float | None], objective: str = "test_accuracy") -> sw.Sweep:
    trials = []
    for num, final in finals.items():
        trial = sw.Trial(
            num,
            ["cluster=local", f"optim.lr={0.01 * (num + 1)}", f"model.width={16 * (num % 2 + 1)}"],
            str(num),
            f"90_{num}",
        )
        trial_dir = tmp_path / str(num)
        trial_dir.mkdir()
        lines = [{"step": s, "time": 0, "loss": 2.0 / s} for s in (10, 20, 30)]
        if final is not None:
            lines.append({"step": 30, "time": 0, objective: final})
        (trial_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
        trials.append(trial)
    sweep = sw.open_sweep(tmp_path, trials, objective)
    sweep.save()
    return sweep


def test_sweep_record_round_trips(tmp_path):
    make_sweep(tmp_path, {0: 0.5, 1: 0.7})
    loaded = sw.load_sweep(tmp_path)
    assert [t.job_id for t in loaded.trials] == ["90_0", "90_1"] and loaded.trials[1].dir == "1"


def test_a_directory_that_is_not_a_sweep_is_named(tmp_path):
    with pytest.raises(sw.SweepError, match="is not a sweep directory"):
        sw.load_sweep(tmp_path)
    assert cli_main(["status", str(tmp_path)]) == 2


def test_trials_group_by_resources_and_split_below_max_array_size():
    small = TrainJobConfig(cluster=ClusterConfig(submit=True, nodes=1))
    big = TrainJobConfig(cluster=ClusterConfig(submit=True, nodes=2))
    configs = [small, big, small, small, big, small, small]
    arrays = sw.plan_arrays(configs, limit=4)  # at most 3 tasks per array
    assert arrays == [[0, 2, 3], [5, 6], [1, 4]]


def test_only_swept_keys_are_shown():
    sweep = sw.open_sweep(
        ROOT, [sw.Trial(0, ["cluster=local", "optim.lr=0.1"], "0"), sw.Trial(1, ["cluster=local", "optim.lr=0.2"], "1")]
    )
    assert sw.swept_overrides(sweep) == {0: ["optim.lr=0.1"], 1: ["optim.lr=0.2"]}


def test_first_error_line_comes_from_the_failing_rank_log(tmp_path):
    sweep = make_sweep(tmp_path, {0: None})
    (tmp_path / "slurm").mkdir()
    (tmp_path / "slurm" / "90_0_0_log.err").write_text("submitit ERROR (2026) - Submitted job triggered an exception\n")
    (tmp_path / "slurm" / "90_0_2_log.err").write_text(
        "[rank 2] Traceback (most recent call last):\n[rank 2]   File x\n[rank 2] ValueError: bad shape (3, 4)\n"
    )
    assert sw.first_error(sweep, sweep.trials[0]) == "ValueError: bad shape (3, 4)"


def test_status_table_and_rerun_rule(tmp_path, monkeypatch):
    """The table shows the sweep's own objective (launch.objective), whatever its name."""
    sweep = make_sweep(tmp_path, {0: 0.9, 1: None, 2: None}, objective="val_bleu")
    assert sw.load_sweep(tmp_path).objective == "val_bleu"
    (tmp_path / "0" / "result.json").write_text("{}")
    (tmp_path / "0" / "slurm_job.json").write_text(
        '{"restart_count": 1, "attempt_nodes": [2, 1], "lost_nodes": ["n2"]}'
    )
    monkeypatch.setattr(
        sw.slurm,
        "array_task_states",
        lambda ids: {"90_0": ("COMPLETED", "00:01:00"), "90_1": ("FAILED", "00:00:09"), "90_2": ("RUNNING", "0:30")},
    )
    rows = sw.sweep_status(sweep)
    assert [r.attempt_nodes for r in rows] == ["2,1", "", ""] and rows[0].restarts == 1
    assert [r.lost_nodes for r in rows] == ["n2", "", ""]
    assert [r.state for r in rows] == ["COMPLETED", "FAILED", "RUNNING"]
    assert rows[0].step == 30 and rows[0].objective == 0.9 and rows[2].loss == pytest.approx(2 / 30)
    table = render_status(rows, sweep.objective)
    header, first = table.splitlines()[:2]
    assert header.split()[9] == "val_bleu" and "0.9" in first
    assert first[header.index("nodes") :].split()[:2] == ["2,1", "n2"]
    assert "optim.lr=0.01 model.width=16" in table and "cluster=local" not in table
    assert table.splitlines()[-1] == "3 trials: 1 completed, 1 failed, 1 running"
    assert [sw.needs_rerun(r, tmp_path / str(r.num)) for r in rows] == [False, True, False]


def test_status_shows_an_objective_that_only_result_json_holds(tmp_path, monkeypatch):
    """launch.objective=final_loss is a figure of the finished run, never a logged metric."""
    sweep = make_sweep(tmp_path, {0: None, 1: None}, objective="final_loss")
    (tmp_path / "0" / "result.json").write_text('{"final_loss": 0.125, "metrics": {"test_accuracy": 0.9}}')
    (tmp_path / "1" / "result.json").write_text("{not json")
    monkeypatch.setattr(
        sw.slurm, "array_task_states", lambda ids: {"90_0": ("COMPLETED", "0:10"), "90_1": ("COMPLETED", "0:10")}
    )
    rows = sw.sweep_status(sweep)
    assert rows[0].objective == 0.125 and rows[1].objective is None
    assert "0.125" in render_status(rows, sweep.objective).splitlines()[1]


def test_status_watch_refreshes_until_every_trial_has_ended(tmp_path, monkeypatch, capsys):
    make_sweep(tmp_path, {0: None, 1: None})
    polls = iter(
        [
            {"90_0": ("RUNNING", "0:10"), "90_1": ("PENDING", "0:00")},
            {"90_0": ("COMPLETED", "0:20"), "90_1": ("RUNNING", "0:10")},
            {"90_0": ("COMPLETED", "0:20"), "90_1": ("FAILED", "0:15")},
        ]
    )
    monkeypatch.setattr(sw.slurm, "array_task_states", lambda ids: next(polls))
    sleeps = []
    monkeypatch.setattr("hpcml.login.polling.time.sleep", sleeps.append)
    assert cli_main(["status", str(tmp_path), "--watch", "--interval", "7"]) == 0
    assert sleeps == [7.0, 7.0]  # three looks, and none after the last trial ended
    assert capsys.readouterr().out.rstrip().endswith("2 trials: 1 completed, 1 failed")


def test_report_picks_the_best_and_writes_tables_and_plots(tmp_path):
    sweep = make_sweep(tmp_path, {0: 0.81, 1: 0.93, 2: 0.88, 3: None})
    report = write_report(sweep, "test_accuracy", "max")
    assert report.best.num == 1 and report.best.value == 0.93
    csv_rows = (tmp_path / "report" / "summary.csv").read_text().splitlines()
    assert csv_rows[0] == "rank,trial,overrides,test_accuracy" and csv_rows[1].startswith("1,1,")
    for name in ("curves_test_accuracy.png", "curves_loss.png", "final_test_accuracy_vs_optim.lr.png"):
        assert (tmp_path / "report" / name).read_bytes()[:4] == b"\x89PNG"
    assert write_report(sweep, "test_accuracy", "min").best.num == 0


def test_report_on_a_metric_nobody_logged(tmp_path):
    sweep = make_sweep(tmp_path, {0: 0.5})
    with pytest.raises(
        sw.SweepError, match="no trial logged a metric named 'bleu'; the trials logged: loss, test_accuracy"
    ):
        write_report(sweep, "bleu", "max")


def run_sweep(*args):
    return subprocess.run(
        [PYTHON, TRAIN, "-m", *args], cwd=ROOT, env=mpi_env(), capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["optim.lrr=0.1,0.2"], "Could not override 'optim.lrr'"),
        (["+optim.lrr=0.1,0.2"], "optim._target_=torch.optim.SGD: it takes no argument 'lrr' (did you mean 'lr'?)"),
        (["optim.lr=choice()"], "empty choice is not legal"),
        (["cluster.nodes=0,1"], "error: trial 0 (cluster=local cluster.nodes=0): cluster.nodes=0"),
    ],
)
def test_bad_sweeps_are_refused_before_anything_is_submitted(args, message, tmp_path):
    done = run_sweep("cluster=local", *args, f"hydra.sweep.dir={tmp_path}")
    assert done.returncode != 0
    assert message in done.stderr
    assert not (tmp_path / "sweep.json").exists()


def test_batches_add_to_one_sweep_record(tmp_path):
    first = sw.open_sweep(tmp_path, [sw.Trial(0, ["optim.lr=0.1"], "0")])
    first.save()
    second = sw.open_sweep(tmp_path, [sw.Trial(1, ["optim.lr=0.2"], "1")])
    second.save()
    assert [t.num for t in sw.load_sweep(tmp_path).trials] == [0, 1]


def test_objective_must_be_in_the_result():
    from hpcml.errors import ConfigError
    from hpcml.outputs import objective

    result = {"metrics": {"test_accuracy": 0.9, "bleu": 31.0}, "final_loss": 0.2, "output_dir": "x"}
    assert objective(result, "test_accuracy") == 0.9 and objective(result, "bleu") == 31.0
    assert objective(result, "final_loss") == 0.2  # a figure of the run itself
    with pytest.raises(
        ConfigError, match="launch.objective=rouge is not in result.json; pick one of: bleu, test_accuracy, final_loss"
    ):
        objective(result, "rouge")


def test_a_local_sweep_runs_every_trial(tmp_path):
    done = run_sweep("optim.lr=0.05,0.1", "train.steps=5", f"hydra.sweep.dir={tmp_path}")
    assert done.returncode == 0, done.stderr
    assert all((tmp_path / str(n) / "result.json").is_file() for n in (0, 1))


def test_an_optimizing_sweeper_gets_each_trials_objective(tmp_path):
    """A sweeper that reads what each trial returns (tests/hydra_plugins/objective_sweeper.py) gets its launch.objective."""
    env = {**mpi_env(), "PYTHONPATH": str(ROOT / "tests")}
    cmd = [
        PYTHON,
        TRAIN,
        "-m",
        "hydra/sweeper=basic",
        "hydra.sweeper._target_=hydra_plugins.objective_sweeper.ObjectiveRecordingSweeper",
        "optim.lr=0.01,0.2",
        "train.steps=20",
        f"hydra.sweep.dir={tmp_path}",
    ]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    accuracies = [
        json.loads((tmp_path / str(n) / "result.json").read_text())["metrics"]["test_accuracy"] for n in range(2)
    ]
    assert json.loads((tmp_path / "objectives.json").read_text()) == accuracies


def test_array_task_states_take_live_state_from_squeue_over_sacct(monkeypatch):
    from hpcml.login import slurm

    answers = {
        "sacct": "90_0|COMPLETED|00:01:00\n90_1|CANCELLED by 0|00:00:03\n90_2|PENDING|00:00:00\n",
        "squeue": "90_2|RUNNING|0:30\n",
    }
    monkeypatch.setattr(slurm, "query", lambda cmd: answers[cmd[0]])
    assert slurm.array_task_states(["90_0", "90_1", "90_2"]) == {
        "90_0": ("COMPLETED", "00:01:00"),
        "90_1": ("CANCELLED", "00:00:03"),
        "90_2": ("RUNNING", "0:30"),
    }
    assert slurm.array_task_states([]) == {}


def test_report_of_a_sweep_without_mode_says_to_give_it(tmp_path, capsys):
    from hpcml.login.cli import main

    assert main(["report", str(tmp_path)]) == 2
    assert "give --mode max (higher is better) or --mode min for a sweep" in capsys.readouterr().err
