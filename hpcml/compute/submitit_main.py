"""What each rank of a submitted job runs: `python -u -m hpcml.compute.submitit_main <job folder>`.

submitit's own `python -m submitit.core._submit` would do, except that a stop signal arriving in the
seconds before hpcml runs (importing submitit, unpickling the job, importing torch) would kill the rank:
here the signal recorder goes in first, and submitit's runner is called as it is.
"""

if __name__ == "__main__":
    from hpcml.compute import early_signals

    early_signals.install()
    from submitit.core.submission import submitit_main

    submitit_main()
