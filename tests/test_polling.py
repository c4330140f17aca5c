"""The login node's poll loop: looks until done, prints only what changed, sleeps only between looks."""

import pytest

from hpcml.login import polling


@pytest.fixture
def sleeps(monkeypatch):
    slept = []
    monkeypatch.setattr(polling.time, "sleep", slept.append)
    return slept


def test_prints_each_change_once_and_stops_when_done(sleeps, capsys):
    answers = iter(["PENDING", "PENDING", "UNKNOWN", "RUNNING", "RUNNING", "COMPLETED"])
    last = polling.poll_until(
        lambda: next(answers),
        lambda state: state == "COMPLETED",
        2.5,
        lambda state: None if state == "UNKNOWN" else f"job 7: {state}",
    )
    assert last == "COMPLETED"
    assert capsys.readouterr().out.splitlines() == ["job 7: PENDING", "job 7: RUNNING", "job 7: COMPLETED"]
    assert sleeps == [2.5] * 5  # six looks, no sleep after the last


def test_done_at_the_first_look_neither_sleeps_nor_looks_again(sleeps, capsys):
    looks = []
    assert polling.poll_until(lambda: looks.append(1) or "x", lambda _: True, 1.0, str) == "x"
    assert looks == [1] and sleeps == [] and capsys.readouterr().out == "x\n"
