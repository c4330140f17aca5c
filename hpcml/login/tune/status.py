"""`hpcml status <study>`: the trials as a sweep's table, each with what the study made of it (pruned,
failed after its retries), and above it the driver's state, the counts and the best trial so far. One
sacct and one squeue per refresh, whatever the number of trials."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from hpcml.login import slurm
from hpcml.login.sweep import TrialStatus, load_sweep, sweep_status
from hpcml.login.tune.study import COMPLETE, FAILED, PRUNED, RUNNING, StudySpec, StudyTrial, best_trial, load_trials
from hpcml.login.tune.submit import driver_job_id
from hpcml.slurm_commands import ACTIVE_STATES


@dataclass
class StudyStatus:
    spec: StudySpec
    driver_job: str | None
    driver_state: str
    trials: list[StudyTrial]
    rows: list[TrialStatus]

    @property
    def best(self) -> StudyTrial | None:
        return best_trial(self.spec, self.trials)

    def header(self) -> str:
        counts = {o: sum(t.outcome == o for t in self.trials) for o in (RUNNING, COMPLETE, PRUNED, FAILED)}
        lines = [
            f"study {self.spec.name}: {len(self.trials)} of {self.spec.n_trials} trials started; "
            + ", ".join(f"{n} {outcome}" for outcome, n in counts.items()),
            f"  driver: job {self.driver_job or '-'} {self.driver_state.lower()}"
            + ("" if self.finished or self.driver_state in ACTIVE_STATES else "  (not running: `hpcml resume` it)"),
        ]
        best = self.best
        if best is not None:
            lines.append(
                f"  best: trial {best.num}, {self.spec.objective}={best.value:.6g}: {' '.join(best.overrides)}"
            )
        return "\n".join(lines)

    @property
    def driver_gone(self) -> bool:
        """The driver has ended (or was never submitted) with trials left: nothing changes until a resume."""
        return not self.finished and self.driver_state not in ACTIVE_STATES and self.driver_state != "UNKNOWN"

    @property
    def finished(self) -> bool:
        return len(self.trials) >= self.spec.n_trials and all(t.outcome != RUNNING for t in self.trials)


def study_status(study_dir: Path) -> StudyStatus:
    spec = StudySpec.load(study_dir)
    trials = load_trials(study_dir)
    sweep = load_sweep(study_dir) if trials else None
    driver = driver_job_id(study_dir)
    jobs = [t.job_id for t in (sweep.trials if sweep else []) if t.job_id] + ([driver] if driver else [])
    states = slurm.array_task_states(jobs)
    rows = sweep_status(sweep, states) if sweep else []
    outcome = {t.num: t.outcome for t in trials}
    # What the study made of a trial says more than Slurm's state: a pruned trial's job ended COMPLETED.
    rows = [_as_the_study_saw_it(r, outcome.get(r.num)) for r in rows]
    driver_state = states.get(driver, ("UNKNOWN", ""))[0] if driver else "NOT SUBMITTED"
    return StudyStatus(spec, driver, driver_state, trials, rows)


def _as_the_study_saw_it(row: TrialStatus, outcome: str | None) -> TrialStatus:
    if outcome == PRUNED:  # stopped on request, or cancelled in the queue: no error to show
        return replace(row, state="PRUNED", error="")
    if outcome == FAILED:
        return replace(row, state="FAILED")
    return row
