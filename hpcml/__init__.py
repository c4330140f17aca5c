"""hpcml: PyTorch data-parallel training as Slurm batch jobs, from a Hydra config to a verified result."""

from hpcml import early_signals

early_signals.install_if_launched()
