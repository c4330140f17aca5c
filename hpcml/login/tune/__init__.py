"""Studies (`hydra/sweeper=study`): an asynchronous, pruning, resumable Optuna search whose driver is a
Slurm job. Login-side code (no torch): it runs on the login node to submit, and as the driver's job."""
