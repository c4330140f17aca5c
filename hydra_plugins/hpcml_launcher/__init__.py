"""Hydra launcher that submits a multirun sweep to Slurm as job arrays and returns at once."""
