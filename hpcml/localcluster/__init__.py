"""A real two-node Slurm cluster on this machine, for `make demo`, the tests and the benchmarks: dev
tooling, apart from both halves of hpcml. `python -m hpcml.localcluster up|down|status`."""
