"""What each rank of a submitted job runs: `python -u -m hpcml.compute.submitit_main <job folder>`.

submitit's own `python -m submitit.core._submit` would do, except that a stop signal arriving in the
seconds before hpcml runs (importing submitit, unpickling the job, importing torch) would kill the rank:
here the signal recorder goes in first, and submitit's runner is called as it is.
"""

from hpcml.compute import early_signals

early_signals.install()

# isort: split
from submitit.core.submission import submitit_main  # noqa: E402

if __name__ == "__main__":
    submitit_main()
