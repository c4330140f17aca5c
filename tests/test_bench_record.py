"""Benchmark bookkeeping: nccl-tests' bus bandwidth, ratios turned the right way, the Markdown table."""

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
    assert "| allreduce | hpcml busbw, 1 MB | 5 GB/s | raw_mpi: 6 GB/s | 0.833 | MISSED (>= 0.95) |" in table
    summary = write_summary(tmp_path).read_text()
    assert "quick mode" in summary and "- allreduce: 2 cores" in summary


def test_a_summary_of_nothing_says_how_to_get_results(tmp_path):
    assert "make bench" in write_summary(tmp_path).read_text()
