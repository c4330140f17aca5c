"""hpcml: PyTorch data-parallel training as Slurm batch jobs, from a Hydra config to a verified result."""
