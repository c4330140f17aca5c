"""The training benchmark times every variant in the same rounds and keeps each round, so a knob is
compared with the defaults, and a loop step with its other agreement, round by round."""

from dataclasses import replace

import pytest

from hpcml.bench import training

TINY = replace(training.COMPUTE_BOUND, width=16, depth=2, input_dim=8, per_rank_batch=4)


def test_every_variant_keeps_every_rounds_step_time(process_group, tmp_path):
    variants = [TINY, replace(TINY, name="comm-bound", width=32)]
    rows = training.measure(variants, process_group, budget_s=0.001, rounds=3, workdir=tmp_path)
    assert [r["name"] for r in rows] == ["compute-bound", "comm-bound"]
    for r in rows:
        assert set(r["rounds_s"]) == {"synced", "local"}  # one rank: no stop agreement to time
        assert all(len(times) == 3 and min(times) > 0 for times in r["rounds_s"].values())


def row(name, ranks, batch=8, **rounds_s):
    r = {"name": name, "ranks": ranks, "per_rank_batch": batch, "comm_wait_share": 0.5, "rounds_s": rounds_s}
    if "loop" in rounds_s:
        r["loop_step_s"] = rounds_s["loop"][0]
    return r


def test_figures_pair_rounds_of_a_path_and_its_baseline():
    rows = [
        row("compute-bound", 1, synced=[1.0, 1.0]),
        row("comm-bound", 1, synced=[1.0, 1.0]),
        row("compute-bound", 2, synced=[2.0, 4.0], loop=[1.0, 2.0], loop_torch_agreement=[2.0, 2.0]),
        row("comm-bound", 2, synced=[1.0, 2.0]),
        row("comm-bound bucket 1 MB view False", 2, synced=[2.0, 2.0]),
    ]
    figures = {f.name.split(",")[0]: f for f in training.figures_for(rows)}
    assert figures["compute-bound samples/s"].round_ratios == pytest.approx([0.5, 0.25])
    assert figures["compute-bound loop step (step + stop agreement)"].round_ratios == pytest.approx([2.0, 1.0])
    assert figures["comm-bound bucket 1 MB view False"].round_ratios == pytest.approx([0.5, 1.0])
