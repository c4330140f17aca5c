"""Benchmark bookkeeping: nccl-tests' bus bandwidth, ratios turned the right way, verdicts on the median
of alternated rounds, and the Markdown table with each figure's spread."""

import json

import pytest

from hpcml.bench.record import BenchResult, Figure, busbw, markdown_table, write_summary


def test_busbw_follows_the_nccl_tests_definition():
    assert busbw(1.0, 2) == pytest.approx(1.0)
    assert busbw(1.0, 4) == pytest.approx(1.5)
    assert busbw(3.0, 8) == pytest.approx(3.0 * 14 / 8)


def test_goodness_turns_times_so_that_higher_is_better():
    bandwidth = Figure("b", "bw", "GB/s", 9.6, "raw", 10.0, higher_is_better=True, target=0.95)
    assert bandwidth.ratio == pytest.approx(0.96) and bandwidth.met
    stall = Figure("c", "stall", "s", 0.02, "sync", 0.1, higher_is_better=False, target=10.0)
    assert stall.goodness == pytest.approx(5.0) and stall.met is False
    assert Figure("d", "x", "s", 1.0, "y", 2.0, higher_is_better=False).met is None


def test_results_and_summary_keep_every_figure_beside_its_baseline(tmp_path):
    result = BenchResult("allreduce", quick=True, params={"sizes": [1]})
    result.figures.append(Figure("allreduce", "hpcml busbw, 1 MB", "GB/s", 5.0, "raw_mpi", 6.0, True, 0.95))
    result.notes.append("2 cores")
    record = json.loads(result.write(tmp_path).read_text())
    assert record["figures"][0]["met"] is False and record["figures"][0]["ratio"] == pytest.approx(5 / 6)
    table = markdown_table([record])
    assert "| allreduce | hpcml busbw, 1 MB | 5 GB/s | raw_mpi: 6 GB/s | 0.833 |  | MISSED (>= 0.95) |" in table
    summary = write_summary(tmp_path).read_text()
    assert "quick mode" in summary and "- allreduce: 2 cores" in summary


def test_a_summary_of_nothing_says_how_to_get_results(tmp_path):
    assert "make bench" in write_summary(tmp_path).read_text()


def test_rounds_keep_their_pairs_and_the_verdict_is_the_median_rounds():
    # One bad round of three does not sink a figure, and one lucky round does not carry it.
    noisy = Figure.from_rounds("a", "bw", "GB/s", [5.0, 9.6, 9.7], "raw", [10.0, 10.0, 10.0], True, 0.95)
    assert noisy.value == 9.6 and noisy.baseline == 10.0 and noisy.rounds == 3
    assert noisy.ratio == pytest.approx(0.96) and noisy.met
    assert noisy.round_ratios == pytest.approx([0.5, 0.96, 0.97])
    lucky = Figure.from_rounds("a", "bw", "GB/s", [9.9, 9.0, 9.1], "raw", [10.0, 10.0, 10.0], True, 0.95)
    assert lucky.met is False and max(lucky.round_goodness) == pytest.approx(0.99)
    # Drift that moves both halves of a round together leaves that round's ratio alone.
    drifting = Figure.from_rounds("a", "t", "s", [1.0, 2.0, 4.0], "raw", [1.0, 2.0, 4.0], False, 1.0)
    assert drifting.round_goodness == pytest.approx([1.0, 1.0, 1.0]) and drifting.met


def test_a_time_figure_turns_each_round_before_taking_the_median():
    stall = Figure.from_rounds("c", "stall", "s", [0.01, 0.02, 0.05], "sync", [1.0, 1.0, 1.0], False, 10.0)
    assert stall.round_goodness == pytest.approx([100.0, 50.0, 20.0])
    assert stall.goodness == pytest.approx(50.0) and stall.met
    record = stall.as_dict()
    assert record["value_rounds"] == (0.01, 0.02, 0.05) and record["baseline_rounds"] == (1.0, 1.0, 1.0)
    assert (record["goodness_min"], record["goodness"], record["goodness_max"]) == pytest.approx((20, 50, 100))
    assert (record["ratio_min"], record["ratio_max"]) == pytest.approx((0.01, 0.05))


def test_a_round_without_its_baseline_is_refused():
    with pytest.raises(ValueError, match="each round's pair"):
        Figure.from_rounds("a", "bw", "GB/s", [1.0, 2.0], "raw", [1.0], True)
    with pytest.raises(ValueError, match="at least one round"):
        Figure.from_rounds("a", "bw", "GB/s", [], "raw", [], True)
    with pytest.raises(ValueError, match="each round must keep its pair"):
        Figure("a", "bw", "GB/s", 1.0, "raw", 1.0, True, None, (1.0,), ())


def test_the_table_shows_the_spread_beside_the_median_and_reads_older_results(tmp_path):
    result = BenchResult("checkpoints", quick=False, params={})
    result.figures.append(
        Figure.from_rounds("checkpoints", "save", "GB/s", [1.0, 1.6, 1.7], "disk", [2.0] * 3, True, 0.8)
    )
    result.write(tmp_path)
    # A result written before rounds were kept: no rounds, no spread, the same verdict as then.
    old = {"benchmark": "startup", "quick": True, "host": "h", "notes": []}
    old["figures"] = [
        {"benchmark": "startup", "name": "launch", "unit": "s", "value": 2.5, "baseline_name": "bare",
         "baseline": 2.0, "higher_is_better": False, "target": None, "ratio": 1.25, "goodness": 0.8, "met": None}
    ]  # fmt: skip
    (tmp_path / "startup.json").write_text(json.dumps(old))
    summary = write_summary(tmp_path).read_text()
    assert "| checkpoints | save | 1.6 GB/s | disk: 2 GB/s | 0.8 | 0.5-0.85 (3) | met (>= 0.8) |" in summary
    assert "| startup | launch | 2.5 s | bare: 2 s | 1.25 |  |  |" in summary
