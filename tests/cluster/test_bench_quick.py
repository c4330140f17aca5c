"""`python -m hpcml.bench --quick`, the benchmarks that submit to the real cluster (the others:
tests/test_quick_benchmarks.py, which holds the checks)."""

from test_quick_benchmarks import quick_benchmarks_report_finite_figures

from hpcml.bench.__main__ import NEEDS_CLUSTER


def test_the_quick_benchmarks_that_submit_to_the_cluster_write_results_and_a_summary(tmp_path):
    records = quick_benchmarks_report_finite_figures(list(NEEDS_CLUSTER), tmp_path)
    assert set(records) == set(NEEDS_CLUSTER), records.keys()  # each ran here and wrote its result
