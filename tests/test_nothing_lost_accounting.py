"""The accounting the real-cluster interrupt tests use (helpers.assert_nothing_lost) catches a job that
restarted from scratch, repeated steps, or skipped some, even when its final weights come out right."""

import pytest
from helpers import assert_nothing_lost, executed_spans

START = "[rank 0] 10:00:00 INFO hpcml: rank 0/4 on node 0/2 (local rank 0), launcher=Slurm (srun)"
STOP = "[rank 0] 10:00:05 WARNING hpcml.compute.trainer: stopping at step {} (signal): saving a checkpoint"
RESUME = "[rank 0] 10:00:20 INFO hpcml.compute.trainer: resumed from /x/step-{0} (step {0}, 6400 samples; ...)"
DONE = "[rank 0] 10:00:40 INFO hpcml: done: {} steps, test accuracy 0.9600, params sha256 ab..., outputs in /x"


def log(*lines: str) -> str:
    return "\n".join(lines)


def test_a_clean_resume_adds_up():
    text = log(START, STOP.format(120), START, RESUME.format(120), DONE.format(300))
    assert executed_spans(text) == [(0, 120), (120, 300)]
    assert_nothing_lost(text, 300, attempts=2)


@pytest.mark.parametrize(
    "text",
    [
        log(START, STOP.format(120), START, DONE.format(300)),  # restarted from step 0
        log(START, STOP.format(120), START, RESUME.format(100), DONE.format(300)),  # repeated 100-120
        log(START, STOP.format(120), START, RESUME.format(150), DONE.format(300)),  # skipped 120-150
        log(START, STOP.format(120)),  # never finished
    ],
)
def test_lost_or_repeated_work_is_caught(text):
    with pytest.raises(AssertionError):
        assert_nothing_lost(text, 300, attempts=2 if text.count(START) == 2 else 1)


def test_other_ranks_lines_do_not_count():
    text = log(START, STOP.format(120), "[rank 2] 10:00:05 WARNING x: stopping at step 999 (signal)")
    assert executed_spans(text) == [(0, 120)]
