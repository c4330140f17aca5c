"""The compute-node half: what runs on every rank inside a Slurm job (or under mpirun/torchrun).

Importing this package does nothing by itself; `hpcml.compute.early_signals.install()` is called by
hpcml's own entry points (jobs/train.py, hpcml.compute.submitit_main), never as a side effect of an import.
"""
