"""Studies (hydra/sweeper=study): the search space, the login-node checks, and the driver's bookkeeping
against a scripted cluster. The real cluster runs one in tests/cluster/test_study_on_cluster.py."""

import json
import math
import re
import subprocess

import optuna
import pytest
from helpers import PYTHON, ROOT, TRAIN, mpi_env, run_train

from hpcml.config import ClusterConfig, TrainConfig, TrainJobConfig, to_plain_dict
from hpcml.login.tune.driver import SlurmSide, StudyDriver
from hpcml.login.tune.space import SearchSpaceError, parse_search_space
from hpcml.login.tune.study import TEMPLATE_CONFIG, StudySpec, load_trials
from hpcml.outputs import METRICS_FILE, RESULT_FILE, STOP_REQUEST


def test_hydra_sweep_syntax_becomes_optuna_distributions():
    space = parse_search_space(
        [
            "optim.lr=tag(log,interval(1e-4,1e-1))",
            "train.steps=range(100,400,100)",
            "model.hidden=choice(64,128)",
            "model.depth=1,2,3",
            "cluster=local",
        ]
    )
    d = space.params
    assert d["optim.lr"] == optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)
    assert d["train.steps"] == optuna.distributions.IntDistribution(100, 300, step=100)  # stop excluded, as Hydra's
    assert d["model.hidden"] == optuna.distributions.CategoricalDistribution([64, 128])
    assert d["model.depth"] == optuna.distributions.CategoricalDistribution([1, 2, 3])
    assert space.fixed == ["cluster=local"]
    assert space.params_from_json(space.to_json()) == d
    assert {"optim.lr": 1e-1} in space.corners() and {"model.depth": 3} in space.corners()
    # A float range excludes its stop, whatever the float error: 0, 0.3, ... 1.8 (2.1 = 7 steps is left out).
    assert parse_search_space(["optim.m=range(0,2.1,0.3)"]).params["optim.m"].high == pytest.approx(1.8)


@pytest.mark.parametrize(
    "override, says",
    [
        ("optim.lr=interval(0.1,0.01)", "low end above its high end"),
        ("optim.lr=tag(log,interval(0,1))", "log scale needs values above 0"),
        ("train.steps=range(10,5)", "is empty"),
        ("train.steps=range(1,5,0)", "needs a positive step"),
        ("optim.lr=tag(fancy,interval(0.1,1))", "unknown tag fancy"),
        ("+optim.extra=1,2", "without \\+, \\+\\+ or ~"),
        ("model.hidden=choice(1,1)", "lists a value twice"),
        ("cluster=local", "nothing to search"),
    ],
)
def test_a_bad_search_space_is_refused_naming_the_key(override, says):
    with pytest.raises(SearchSpaceError, match=says):
        parse_search_space([override])


def submit_study(*args: str) -> subprocess.CompletedProcess:
    cmd = [PYTHON, TRAIN, "-m", "cluster=local", "hydra/sweeper=study", *args]
    return subprocess.run(cmd, cwd=ROOT, env=mpi_env(), capture_output=True, text=True, timeout=120)


MAX = "hydra.sweeper.direction=maximize"


@pytest.mark.parametrize(
    "args, says",
    [
        (["optim.lr=0.1,0.2"], "hydra.sweeper.direction=None: say whether launch.objective"),
        (["hydra.sweeper.direction=up", "optim.lr=0.1,0.2"], "hydra.sweeper.direction=up"),
        ([MAX, "model=mlp,gpt"], "model is a config group"),
        ([MAX, "optim.lrr=0.1,0.2"], "optim.lrr"),
        ([MAX, "optim.lr=choice()"], "empty choice is not legal"),
        ([MAX, "train.steps=choice(10,ten)"], "train.steps=ten, which the config refuses"),
        ([MAX, "hydra.sweeper.pruner=median", "optim.lr=0.1,0.2"], "train.eval_every_steps=0 reports none"),
        ([MAX, "hydra.sweeper.sampler=grid", "hydra.sweeper.n_trials=3", "optim.lr=0.1,0.2"], "the grid has 2 points"),
        ([MAX, "hydra.sweeper.sampler=grid", "optim.lr=interval(0.1,0.2)"], "needs a finite set of values"),
        ([MAX, "cluster=none", "optim.lr=0.1,0.2"], "cluster.submit is false"),
    ],
)
def test_a_study_the_config_refuses_submits_nothing_and_says_why(tmp_path, args, says):
    """Checked before anything reaches Slurm (the search space, its values in the config, the settings)."""
    done = submit_study(f"hydra.sweep.dir={tmp_path / 'study'}", *args)
    assert done.returncode != 0
    assert says in done.stderr, done.stderr
    assert not (tmp_path / "study").exists()


@pytest.mark.mpi
def test_a_stop_request_ends_a_run_at_a_step_boundary_on_every_rank_with_a_checkpoint(tmp_path):
    """What a pruned trial does: rank 0 reads the request, both ranks stop at the same step, save it, and the
    run exits 0 (its job ends COMPLETED) without a result and without asking to be requeued."""
    (tmp_path / STOP_REQUEST).write_text(json.dumps({"reason": "pruned by study s after step 20"}))
    done = run_train([f"train.output_dir={tmp_path}", "train.steps=50"], ranks=2)
    assert "stopped: pruned by study s after step 20; checkpoint saved, not requeued" in done.stderr
    stops = re.findall(r"stopping at step (\d+) \(requested\)", done.stderr)
    assert len(stops) == 2 and stops[0] == stops[1], stops  # each rank logs its own
    assert (tmp_path / "checkpoints" / f"step-{stops[0]}").is_dir()
    assert not (tmp_path / RESULT_FILE).exists()


# ---------------------------------------------------------------- the driver, against a scripted cluster


def score(lr: float) -> float:
    """The metric a trial with this learning rate reaches: best at lr = 0.1."""
    return 1.0 - abs(math.log10(lr) + 1.0) / 4


class ScriptedCluster(SlurmSide):
    """Jobs that advance one evaluation per look: each writes the metric at steps 10, 20, ... 50, then its result;
    trial n's job takes 5 + n % 3 looks (the metric at 50 is its last). A job whose stop request is there stops
    (COMPLETED, no result); `fail_first` jobs of a trial fail."""

    def __init__(self, fail_first: dict[int, int] | None = None):
        self.jobs: dict[str, dict] = {}
        self.fail_first = dict(fail_first or {})
        self.most_running = 0
        # Trial number -> the trials whose jobs were running when its job was submitted.
        self.running_at_submit: dict[int, set[int]] = {}

    def submit(self, spec, trial, cfg, folder):
        job_id = str(100 + len(self.jobs))
        failing = self.fail_first.get(trial.num, 0) > 0
        if failing:
            self.fail_first[trial.num] -= 1
        out = cfg.train.output_dir
        self.running_at_submit[trial.num] = {j["num"] for j in self.jobs.values() if j["state"] == "RUNNING"}
        self.jobs[job_id] = dict(name=spec.job_name(trial.num), num=trial.num, out=out, lr=cfg.optim["lr"], tick=0)
        self.jobs[job_id].update(state="RUNNING", fails=failing, length=5 + trial.num % 3)
        return job_id

    def states(self, job_ids):
        for job_id in job_ids:
            self.advance(self.jobs[job_id])
        self.most_running = max(self.most_running, sum(j["state"] == "RUNNING" for j in self.jobs.values()))
        return {job_id: (self.jobs[job_id]["state"], "") for job_id in job_ids}

    def advance(self, job):
        from pathlib import Path

        out = Path(job["out"])
        if job["state"] != "RUNNING":
            return
        if job["fails"]:
            job["state"] = "FAILED"
            return
        if (out / STOP_REQUEST).exists():
            job["state"] = "COMPLETED"
            return
        job["tick"] += 1
        step = 10 * min(job["tick"], 5)
        value = score(job["lr"]) * step / 50
        with open(out / METRICS_FILE, "a") as f:
            f.write(json.dumps({"step": step, "test_accuracy": value}) + "\n")
        if job["tick"] == job["length"]:
            (out / RESULT_FILE).write_text(json.dumps({"metrics": {"test_accuracy": value}}))
            job["state"] = "COMPLETED"

    def jobs_named(self, names, since):
        return {j["name"]: job_id for job_id, j in self.jobs.items() if j["name"] in names}

    def cancel(self, job_id):
        self.jobs[job_id]["state"] = "CANCELLED"

    def other_drivers(self, name):
        return []


def journal(tmp_path) -> optuna.storages.JournalStorage:
    backend = optuna.storages.journal.JournalFileBackend(str(tmp_path / "study" / "optuna.journal"))
    return optuna.storages.JournalStorage(backend)


def make_study(tmp_path, **settings) -> StudySpec:

    study_dir = tmp_path / "study"
    study_dir.mkdir()
    template = TrainJobConfig(
        train=TrainConfig(steps=50, eval_every_steps=10, output_dir=str(study_dir)),
        cluster=ClusterConfig(name="local", nodes=1, tasks_per_node=1),
    )
    (study_dir / TEMPLATE_CONFIG).write_text(json.dumps(to_plain_dict(template)))
    spec = StudySpec(**{**SPEC_DEFAULTS, **settings})
    spec.save(study_dir)
    return spec


SPEC_DEFAULTS = dict(
    name="s",
    storage=None,
    direction="maximize",
    objective="test_accuracy",
    n_trials=8,
    max_parallel=3,
    max_retries=1,
    sampler="random",
    seed=0,
    pruner="none",
    pruner_args={},
    poll_s=0,
    space=parse_search_space(["optim.lr=tag(log,interval(1e-4,1.0))"]).to_json(),
    token="t0",
)


def test_the_driver_keeps_max_parallel_trials_in_flight_and_tells_optuna_each_result(tmp_path):
    make_study(tmp_path)
    cluster = ScriptedCluster()
    summary = StudyDriver(tmp_path / "study", cluster, sleep=lambda s: None).run()
    trials = load_trials(tmp_path / "study")
    assert [t.num for t in trials] == list(range(8)) and summary["counts"] == {"complete": 8}
    assert cluster.most_running == 3  # never more than max_parallel
    # No batches: trial 0 (5 looks) ends before trials 1 and 2 (6 and 7), and trial 3 starts beside them.
    assert cluster.running_at_submit[3] == {1, 2}
    assert len(cluster.jobs) == 8  # each trial submitted once
    study = optuna.load_study(
        study_name="s",
        storage=optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(str(tmp_path / "study" / "optuna.journal"))
        ),
    )
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 8
    for t in trials:
        assert t.value == pytest.approx(score(t.params["optim.lr"]))
        assert study.trials[t.num].intermediate_values[50] == pytest.approx(t.value)  # every evaluation reported
    assert summary["best"] == max(trials, key=lambda t: t.value).num


def test_a_pruned_trial_is_told_to_stop_and_recorded_pruned_with_its_last_value(tmp_path):
    make_study(tmp_path, n_trials=10, pruner="median", pruner_args={"n_startup_trials": 3, "n_warmup_steps": 10})
    cluster = ScriptedCluster()
    StudyDriver(tmp_path / "study", cluster, sleep=lambda s: None).run()
    trials = load_trials(tmp_path / "study")
    pruned = [t for t in trials if t.outcome == "pruned"]
    assert pruned and len(trials) == 10
    for t in pruned:
        assert (tmp_path / "study" / t.dir / STOP_REQUEST).exists()
        job = next(j for j in cluster.jobs.values() if j["num"] == t.num)
        assert job["tick"] < 5  # stopped early
        last = json.loads((tmp_path / "study" / t.dir / METRICS_FILE).read_text().splitlines()[-1])
        assert t.value == last["test_accuracy"]  # recorded with the last value it reported
    study = optuna.load_study(study_name="s", storage=journal(tmp_path))
    assert sorted(t.number for t in study.trials if t.state.name == "PRUNED") == [t.num for t in pruned]


def test_a_failed_trial_is_retried_then_recorded_failed(tmp_path):
    make_study(tmp_path, n_trials=3, max_parallel=3, max_retries=1)
    cluster = ScriptedCluster(fail_first={0: 1, 1: 2})
    StudyDriver(tmp_path / "study", cluster, sleep=lambda s: None).run()
    outcomes = {t.num: (t.outcome, t.retries) for t in load_trials(tmp_path / "study")}
    assert outcomes == {0: ("complete", 1), 1: ("failed", 1), 2: ("complete", 0)}


def test_a_restarted_driver_finds_the_jobs_it_submitted_and_submits_no_trial_twice(tmp_path):
    """Stopped after recording trial 3 and submitting its job, before writing the job's id down."""
    make_study(tmp_path, n_trials=6)
    cluster = ScriptedCluster()
    first = StudyDriver(tmp_path / "study", cluster, sleep=lambda s: None)
    real_submit = cluster.submit

    def stop_after_the_fourth(*args):
        job_id = real_submit(*args)
        if len(cluster.jobs) == 4:
            raise KeyboardInterrupt  # the driver dies with trial 3's job submitted and its id unrecorded
        return job_id

    cluster.submit = stop_after_the_fourth
    with pytest.raises(KeyboardInterrupt):
        for _ in range(20):
            first.poll_once()
    cluster.submit = real_submit
    unrecorded = [t.num for t in load_trials(tmp_path / "study") if t.job_id is None]
    assert unrecorded == [3]
    StudyDriver(tmp_path / "study", cluster, sleep=lambda s: None).run()
    trials = load_trials(tmp_path / "study")
    assert len(trials) == 6 and all(t.outcome == "complete" for t in trials)
    names = [j["name"] for j in cluster.jobs.values()]
    assert len(names) == len(set(names)) == 6  # no trial submitted twice


@pytest.mark.parametrize("sampler", ["tpe", "cmaes", "grid"])
def test_each_sampler_drives_a_study_to_its_end(tmp_path, sampler):
    space = "optim.lr=0.001,0.01,0.1,0.3" if sampler == "grid" else "optim.lr=tag(log,interval(1e-4,1.0))"
    make_study(tmp_path, sampler=sampler, n_trials=4, space=parse_search_space([space]).to_json())
    StudyDriver(tmp_path / "study", ScriptedCluster(), sleep=lambda s: None).run()
    trials = load_trials(tmp_path / "study")
    assert [t.outcome for t in trials] == ["complete"] * 4
    if sampler == "grid":  # every point once
        assert sorted(t.params["optim.lr"] for t in trials) == [0.001, 0.01, 0.1, 0.3]


def test_the_driver_script_survives_a_term_requeues_itself_at_its_time_limit_and_runs_one_process(tmp_path):
    from hpcml.login.tune.submit import DriverResources, driver_script

    template = TrainJobConfig(
        cluster=ClusterConfig(name="site", partition="gpu", account="proj", setup=["module load x"])
    )
    spec = StudySpec(**{**SPEC_DEFAULTS, "space": parse_search_space(["optim.lr=0.1,0.2"]).to_json()})
    script = driver_script(template, tmp_path, spec, DriverResources(time_min=60)).splitlines()
    for line in ("#SBATCH --requeue", "#SBATCH --signal=B:USR2@120", "#SBATCH --time=60", "#SBATCH --partition=gpu",
                 "#SBATCH --account=proj", "#SBATCH --cpus-per-task=1", "#SBATCH --job-name=hpcml-study-t0",
                 "module load x", "trap '' TERM"):  # fmt: skip
        assert line in script, line
    assert script.index("module load x") < script.index("trap '' TERM") == len(script) - 2
    assert script[-1].startswith("exec ") and script[-1].endswith(f"-m hpcml.login.tune.driver {tmp_path}")
    assert not any("srun" in line for line in script)  # one process: the exec'd driver inherits the ignored TERM


def test_a_job_slurm_forgot_is_judged_by_its_outputs_instead_of_awaited_forever(tmp_path, monkeypatch):
    from hpcml.login.tune import driver

    class Forgetful(ScriptedCluster):
        """Accounting lost: a job that ended is listed nowhere."""

        def states(self, job_ids):
            known = super().states(job_ids)
            return {job: state for job, state in known.items() if state[0] == "RUNNING"}

    monkeypatch.setattr(driver, "LOST_AFTER_S", 0)
    make_study(tmp_path, n_trials=3)
    StudyDriver(tmp_path / "study", Forgetful(), sleep=lambda s: None).run()
    assert [t.outcome for t in load_trials(tmp_path / "study")] == ["complete"] * 3


def test_a_driver_told_to_stop_leaves_its_records_whole_and_a_new_one_finishes_the_study(tmp_path):
    make_study(tmp_path, n_trials=6, poll_s=1)
    cluster = ScriptedCluster()
    first = StudyDriver(tmp_path / "study", cluster)

    def term_while_waiting(seconds):
        first.stopping = True  # what the TERM handler in driver.main sets

    first.sleep = term_while_waiting
    assert first.run()["stopped"]
    assert len(cluster.jobs) == 3 and all(t.job_id for t in load_trials(tmp_path / "study"))
    StudyDriver(tmp_path / "study", cluster, sleep=lambda s: None).run()
    assert [t.outcome for t in load_trials(tmp_path / "study")] == ["complete"] * 6 and len(cluster.jobs) == 6


@pytest.mark.parametrize(
    "state, requeue_fails, code, requeued",
    [("CANCELLED", False, 0, False), ("RUNNING", False, 0, True), ("RUNNING", True, 1, True)],
)
def test_after_a_term_the_driver_leaves_only_once_its_job_is_cancelled_or_requeued(
    monkeypatch, state, requeue_fails, code, requeued
):
    from hpcml.errors import SubmissionError
    from hpcml.login.tune import driver

    calls = []

    def scontrol(cmd):
        calls.append(cmd)
        if requeue_fails:
            raise SubmissionError("scontrol requeue: Requested operation is presently disabled")

    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setattr(driver, "job_state", lambda job: state)
    monkeypatch.setattr(driver, "run", scontrol)
    assert driver.leave_after_a_term(wait_s=0) == code  # 1: waited for a kill that never came, and said so
    assert (calls == [["scontrol", "requeue", "42"]]) == requeued
