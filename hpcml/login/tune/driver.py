"""The study driver: a small Slurm job (one CPU) that asks Optuna for trials and runs each as a Slurm job.

It keeps `max_parallel` trials in flight and starts the next as soon as any ends (no batches), reports each
trial's evaluations to Optuna as they appear in its metrics.jsonl, tells a trial the pruner condemns to
stop (a stop request its rank 0 reads at the next step boundary: it saves and leaves, COMPLETED), resubmits
a failed trial up to `max_retries` times (it resumes from its checkpoint), and tells Optuna how each ended.

Nothing lives only in the driver's memory. Everything is written down before the step that depends on it:
a trial is recorded (trials.json) before its job is submitted, and its job's name carries the study's token
and the trial's number, so a driver that was preempted, requeued or killed and started again finds every
job it submitted, even one whose id it never wrote down, and submits no trial twice.

Never imports torch: it runs beside the trials on one CPU, and starts in a second.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import optuna
import submitit

from hpcml.config import TrainJobConfig, to_plain_dict, with_values
from hpcml.errors import HpcmlError, report_error
from hpcml.fileio import write_atomically
from hpcml.job_entry import TrainingJob
from hpcml.login import launch, slurm
from hpcml.login.sweep import Sweep, Trial, write_trial_files
from hpcml.login.tune.study import (
    COMPLETE,
    FAILED,
    PRUNED,
    RUNNING,
    StudyError,
    StudySpec,
    StudyTrial,
    best_trial,
    distributions,
    load_optuna_study,
    load_trials,
    make_sampler,
    save_trials,
)
from hpcml.login.tune.submit import load_template
from hpcml.outputs import METRICS_FILE, RESULT_FILE, STOP_REQUEST, read_metrics, read_objective
from hpcml.slurm_commands import REQUEUED_STATES, TERMINAL_STATES, job_state, run

log = logging.getLogger("hpcml.login.tune")
# How long a trial's job may be missing from both squeue and sacct before it is judged by its outputs.
LOST_AFTER_S = 600


class SlurmSide:
    """What the driver asks of Slurm, in one place (tests give it a fake cluster)."""

    def submit(self, spec: StudySpec, trial: StudyTrial, cfg: TrainJobConfig, folder: Path) -> str:
        executor = launch.make_executor(cfg, folder)
        executor.update_parameters(job_name=spec.job_name(trial.num))
        # The driver's own SLURM_* variables would otherwise pass into the trial's job (and its srun).
        with submitit.helpers.clean_env():
            return executor.submit(TrainingJob(to_plain_dict(cfg))).job_id

    def states(self, job_ids: list[str]) -> dict[str, tuple[str, str]]:
        return slurm.array_task_states(job_ids)  # one sacct and one squeue, whatever the number of jobs

    def jobs_named(self, names: list[str], since: float) -> dict[str, str]:
        return slurm.jobs_named(names, since)

    def cancel(self, job_id: str) -> None:
        run(["scancel", job_id])

    def other_drivers(self, name: str) -> list[str]:
        """Queued or running jobs called `name` other than this one: drivers of the same study."""
        own = os.environ.get("SLURM_JOB_ID")
        listed = run(["squeue", "-h", "--name", name, "-t", "RUNNING,COMPLETING", "-o", "%i"]).split()
        return [job for job in listed if job != own]


class StudyDriver:
    def __init__(
        self, study_dir: Path, slurm_side: SlurmSide | None = None, sleep: Callable[[float], None] = time.sleep
    ):
        self.dir = Path(study_dir).resolve()
        self.slurm = slurm_side or SlurmSide()
        self.sleep = sleep
        # Set by a TERM (`main`): the loop ends after its current look, with every record written.
        self.stopping = False
        self.spec = StudySpec.load(self.dir)
        self.template = load_template(self.dir)
        self.trials = load_trials(self.dir)
        # Seeded past every trial Optuna handed out (recorded or not): a restart must not replay earlier draws.
        self.study = load_optuna_study(self.spec, self.dir)
        self.study.sampler = make_sampler(self.spec, seed_offset=len(self.study.get_trials(deepcopy=False)))
        # Trial number -> when its job was first missing from both squeue and sacct (see `lost`).
        self.unknown_since: dict[int, float] = {}
        # Trials recorded without a job id: submitted or not, Slurm is asked by name before anything else.
        self.unconfirmed = {t.num for t in self.trials if t.outcome == RUNNING and t.job_id is None}

    # ------------------------------------------------------------ the loop

    def run(self) -> dict[str, object]:
        try:
            others = self.slurm.other_drivers(self.spec.driver_job_name)
        except HpcmlError as err:  # squeue did not answer: a busy controller must not end the study
            log.warning("cannot check for another driver of this study (%s); going on", err)
            others = []
        if others:
            # Two drivers would each fill max_parallel and answer to the same trials.
            raise StudyError(f"job {others[0]} drives study {self.spec.name} already; this driver stops here.")
        self.adopt_orphans()
        log.info("study %s: %d of %d trials so far", self.spec.name, len(self.trials), self.spec.n_trials)
        while not self.stopping:
            self.poll_once()
            if len(self.trials) >= self.spec.n_trials and not self.active():
                break
            self.pause(self.spec.poll_s)
        if self.stopping:
            return {"counts": self.counts(), "best": None, "stopped": True}
        best = self.best()
        log.info("study %s finished: %s", self.spec.name, self.counts())
        if best is not None:
            log.info("best: trial %d, %s=%.6g, %s", best.num, self.spec.objective, best.value, " ".join(best.overrides))
        return {"counts": self.counts(), "best": None if best is None else best.num}

    def pause(self, seconds: float) -> None:
        """Sleep between looks, in slices, so that a TERM (see `main`) is acted on within a second."""
        left = seconds
        while not self.stopping and left > 0:
            self.sleep(min(left, 0.5))
            left -= 0.5

    def poll_once(self) -> None:
        """One look at every trial in flight, then new trials up to max_parallel; records saved after each change."""
        self.confirm_submissions()
        for trial in [t for t in self.active() if t.job_id is None and t.num not in self.unconfirmed]:
            self.submit(trial)
        running = [t for t in self.active() if t.job_id is not None]
        states = self.slurm.states([t.job_id for t in running])
        for trial in running:
            state = states.get(trial.job_id, ("UNKNOWN", ""))[0]
            self.report_progress(trial, state)
            if trial.prune_requested_at is not None and state in ("PENDING", "REQUEUED"):
                self.cancel_queued(trial)  # pruned while running, since requeued: it would only stop at once
            if state in TERMINAL_STATES or self.lost(trial, state):
                self.settle(trial, state)
        while len(self.active()) < self.spec.max_parallel and len(self.trials) < self.spec.n_trials:
            self.submit(self.new_trial())

    def active(self) -> list[StudyTrial]:
        return [t for t in self.trials if t.outcome == RUNNING]

    # ------------------------------------------------------------ trials

    def new_trial(self) -> StudyTrial:
        asked = self.study.ask(distributions(self.spec))
        trial = StudyTrial(asked.number, dict(asked.params), trial_id=asked._trial_id)
        self.trials.append(trial)
        self.save()  # on record before its job exists: a restarted driver asks Slurm for it by name
        return trial

    def adopt_orphans(self) -> None:
        """Trials Optuna handed out that were never recorded (the driver stopped in between): run them."""
        known = {t.num for t in self.trials}
        for frozen in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            if frozen.number not in known:
                log.info("trial %d: asked before the driver stopped, never recorded; running it now", frozen.number)
                self.trials.append(StudyTrial(frozen.number, dict(frozen.params), trial_id=frozen._trial_id))
                self.unconfirmed.add(frozen.number)
        self.trials.sort(key=lambda t: t.num)
        self.save()

    def confirm_submissions(self) -> None:
        """Job ids for trials recorded without one: the job Slurm knows by the trial's name, if any."""
        if not self.unconfirmed:
            return
        names = {self.spec.job_name(num): num for num in self.unconfirmed}
        try:
            found = self.slurm.jobs_named(sorted(names), self.spec.created)
        except HpcmlError as err:
            log.warning("cannot ask Slurm which trials were submitted (%s); asking again next time", err)
            return
        for name, num in names.items():
            trial = next(t for t in self.trials if t.num == num)
            # A retry's earlier job has the same name: only a job the trial has not had yet is this attempt's.
            if name in found and found[name] not in trial.previous_job_ids:
                trial.job_id = found[name]
                log.info("trial %d: found its job %s, submitted before the driver stopped", num, trial.job_id)
        self.unconfirmed.clear()
        self.save()

    def trial_config(self, trial: StudyTrial) -> TrainJobConfig:
        values = {**trial.params, "train.output_dir": str(self.dir / trial.dir)}
        return with_values(self.template, values)

    def submit(self, trial: StudyTrial) -> None:
        try:
            cfg = self.trial_config(trial)
        except (
            HpcmlError
        ) as err:  # a value the sampler drew that the config refuses: the trial fails, the study goes on
            log.error("trial %d (%s): %s", trial.num, " ".join(trial.overrides), err)
            self.finish(trial, FAILED)
            return
        write_trial_files(self.dir, Trial(trial.num, trial.overrides, trial.dir), cfg)
        folder = self.dir / launch.JOB_FOLDER
        launch.prepare_job_folder(folder)
        if trial.job_id is not None:
            trial.previous_job_ids.append(trial.job_id)
        trial.job_id = None
        self.save()
        try:
            trial.job_id = self.slurm.submit(self.spec, trial, cfg, folder)
        except Exception as err:  # sbatch refused or timed out (a busy controller, a job limit): try again later
            # It may have been submitted all the same: Slurm is asked for it by name before it goes out again.
            log.warning("trial %d: submitting it failed (%s); trying again next time", trial.num, err)
            self.unconfirmed.add(trial.num)
            return
        self.save()
        again = f" (retry {trial.retries})" if trial.retries else ""
        log.info("trial %d%s: job %s, %s", trial.num, again, trial.job_id, " ".join(trial.overrides))

    def report_progress(self, trial: StudyTrial, state: str) -> None:
        """Report the trial's new evaluations to Optuna; ask its pruner whether the trial should stop."""
        records = read_metrics(self.dir / trial.dir / METRICS_FILE)
        new = [r for r in records if self.spec.objective in r and r.get("step", -1) > trial.reported_step]
        if not new:
            return
        handle = optuna.trial.Trial(self.study, trial.trial_id)
        for record in new:
            handle.report(float(record[self.spec.objective]), int(record["step"]))
            trial.reported_step = int(record["step"])
        finished = (self.dir / trial.dir / RESULT_FILE).exists()  # its last evaluation: nothing left to save
        if trial.prune_requested_at is None and state not in TERMINAL_STATES and not finished and handle.should_prune():
            self.request_stop(trial, state)
        self.save()

    def request_stop(self, trial: StudyTrial, state: str) -> None:
        trial.prune_requested_at = trial.reported_step
        reason = f"pruned by study {self.spec.name} after step {trial.reported_step}"
        request = json.dumps({"reason": reason, "requested": time.time()}).encode()
        write_atomically(self.dir / trial.dir / STOP_REQUEST, lambda f: f.write(request))
        log.info("trial %d: %s; asked to stop", trial.num, reason)
        if state in ("PENDING", "REQUEUED"):
            self.cancel_queued(trial)

    def cancel_queued(self, trial: StudyTrial) -> None:
        """A pruned trial's job waiting in the queue holds no nodes and has nothing to save: cancel it."""
        try:
            self.slurm.cancel(trial.job_id)
        except HpcmlError as err:
            log.warning("trial %d: cancelling its queued job failed (%s); it stops when it starts", trial.num, err)

    def lost(self, trial: StudyTrial, state: str) -> bool:
        """Slurm has not known the trial's job for LOST_AFTER_S (neither squeue nor sacct lists it: no
        accounting, or its records were purged): it is judged by what it left, rather than waited for forever."""
        if state != "UNKNOWN":
            self.unknown_since.pop(trial.num, None)
            return False
        since = self.unknown_since.setdefault(trial.num, time.monotonic())
        if time.monotonic() - since < LOST_AFTER_S:
            return False
        log.warning(
            "trial %d: Slurm has not known job %s for %d s; judging it by its outputs",
            trial.num,
            trial.job_id,
            LOST_AFTER_S,
        )
        return True

    def settle(self, trial: StudyTrial, state: str) -> None:
        trial_dir = self.dir / trial.dir
        try:
            value = read_objective(trial_dir, self.spec.objective)
        except (HpcmlError, OSError, ValueError) as err:  # it finished, without the metric: a rerun would not help
            log.error("trial %d: job %s finished, but its result cannot be judged: %s", trial.num, trial.job_id, err)
            self.finish(trial, FAILED)
            return
        if value is not None and not math.isfinite(value):
            log.error(
                "trial %d: job %s finished with %s=%s; recorded failed",
                trial.num,
                trial.job_id,
                self.spec.objective,
                value,
            )
            self.finish(trial, FAILED)
        elif value is not None:
            self.finish(trial, COMPLETE, value)
        elif trial.prune_requested_at is not None:
            self.finish(trial, PRUNED)
        elif trial.retries < self.spec.max_retries:
            log.warning("trial %d: job %s ended %s with no result; resubmitting it", trial.num, trial.job_id, state)
            self.submit(trial)
        else:
            log.error(
                "trial %d: job %s ended %s with no result after %d retries; recorded failed",
                trial.num,
                trial.job_id,
                state,
                trial.retries,
            )
            self.finish(trial, FAILED)

    def finish(self, trial: StudyTrial, outcome: str, value: float | None = None) -> None:
        state = {
            COMPLETE: optuna.trial.TrialState.COMPLETE,
            PRUNED: optuna.trial.TrialState.PRUNED,
            FAILED: optuna.trial.TrialState.FAIL,
        }[outcome]
        # skip_if_finished: a driver stopped between telling Optuna and saving its record tells it again.
        frozen = self.study.tell(trial.num, value if outcome == COMPLETE else None, state=state, skip_if_finished=True)
        trial.outcome = outcome
        if value is None and frozen.intermediate_values:
            value = frozen.intermediate_values[max(frozen.intermediate_values)]  # a pruned trial's last value
        trial.value = value
        self.save()
        best = self.best()
        shown = "" if trial.value is None else f" {self.spec.objective}={trial.value:.6g}"
        log.info(
            "trial %d %s%s; best so far: %s",
            trial.num,
            outcome,
            shown,
            "none" if best is None else f"trial {best.num} ({best.value:.6g})",
        )

    # ------------------------------------------------------------ records

    def best(self) -> StudyTrial | None:
        return best_trial(self.spec, self.trials)

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for trial in self.trials:
            counts[trial.outcome] = counts.get(trial.outcome, 0) + 1
        return counts

    def save(self) -> None:
        save_trials(self.dir, self.trials)
        # The same trials as a sweep record: `hpcml status` and `hpcml report` read a study as a sweep.
        sweep = Sweep(
            self.dir,
            [Trial(t.num, t.overrides, t.dir, t.job_id, list(t.previous_job_ids)) for t in self.trials],
            self.spec.created,
            self.spec.objective,
        )
        sweep.save()


def requeue_at_time_limit(signum: int, frame: object) -> None:
    """Slurm's warning before the driver's time limit (--signal=B:USR2): requeue the job, which then comes
    back and re-attaches. Nothing is lost if this lands mid-write: every record is written atomically."""
    job_id = os.environ.get("SLURM_JOB_ID")
    log.warning("time limit near: requeueing the driver's job %s", job_id)
    if job_id:
        run(["scontrol", "requeue", job_id])


def main(argv: list[str]) -> int:
    """`python -m hpcml.login.tune.driver <study>`: what the driver's batch script (submit.py) runs."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    signal.signal(signal.SIGUSR2, requeue_at_time_limit)
    try:
        driver = StudyDriver(Path(argv[0]))
        # A TERM (until now ignored, as the batch script left it) ends the loop after its current look.
        signal.signal(signal.SIGTERM, lambda signum, frame: setattr(driver, "stopping", True))
        driver.run()
    except HpcmlError as err:
        return report_error(err)
    return leave_after_a_term() if driver.stopping else 0


def leave_after_a_term(wait_s: float = 600) -> int:
    """A TERM came from `scancel` (the job is CANCELLED: leave now, `hpcml resume` goes on), a preemption or a
    requeue, or `scancel --signal=TERM` alone. As a training job's rank 0 does, requeue the job, then leave:
    it comes back and re-attaches. What must not happen is leaving before the job is requeued (measured: a
    driver that died of a preemption's TERM ended FAILED, not requeued)."""
    job_id = os.environ.get("SLURM_JOB_ID")
    state = job_state(job_id) if job_id else None
    if job_id is None or state == "CANCELLED":
        log.warning("the driver's job was cancelled: stopped; `hpcml resume <study>` goes on from here")
        return 0
    try:
        run(["scontrol", "requeue", job_id])
        log.warning("stopped by a TERM; job %s requeued", job_id)
        return 0
    except HpcmlError as err:
        state = job_state(job_id)
        if "pending execution" in str(err) or state in REQUEUED_STATES:
            log.warning("stopped by a TERM; Slurm is requeueing job %s already (%s)", job_id, state)
            return 0
        log.warning("stopped by a TERM; requeueing job %s failed (%s): waiting for Slurm to end it", job_id, err)
    time.sleep(wait_s)  # Slurm's kill ends this: a preemption's grace time, or KillWait
    log.error("stopped by a TERM, but Slurm neither requeued nor ended job %s: `hpcml resume <study>`", job_id)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
