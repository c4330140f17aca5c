"""A step that takes far longer than it should leaves the stack of each thread of its rank in the log."""

import subprocess
import sys

from helpers import ROOT

STEPS = """
import threading, time
from hpcml.compute.stall_report import StallReport

report = StallReport(1.0)
def quick_step():
    time.sleep(0.1)
def stuck_step():
    time.sleep(2.5)
def loader_thread():
    time.sleep(30)
threading.Thread(target=loader_thread, daemon=True).start()
for _ in range(12):  # 1.2 s of steps, each well under 1 s: the watchdog is kept armed, so no report
    report.step_started()
    quick_step()
report.step_started()
stuck_step()
report.close()
report.step_started()
report.close()
time.sleep(1.5)  # closed: nothing more
"""


def test_only_a_step_that_outlasts_the_report_time_writes_every_threads_stack():
    done = subprocess.run([sys.executable, "-c", STEPS], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("Timeout (") == 1, done.stderr
    assert "in stuck_step" in done.stderr and "in loader_thread" in done.stderr, done.stderr
    assert "in quick_step" not in done.stderr
