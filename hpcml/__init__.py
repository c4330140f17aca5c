"""hpcml: PyTorch data-parallel training as Slurm batch jobs, from a Hydra config to a verified result.

hpcml.login runs on the login node, hpcml.compute inside the job; the modules directly in this package
(config, errors, outputs, fileio, slurm_commands, job_entry) are the few pieces both halves share.
Importing any of it has no side effects.
"""
