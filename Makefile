# hpcml: two commands do all set-up on a fresh machine:
#   make demo   # install, start the local 2-node Slurm cluster, run a 2 nodes x 2 ranks training job
#   make test   # the whole test suite, end-to-end cluster tests included
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel; a bare `torch` would pull several GB of CUDA wheels. On a GPU cluster use the CUDA build.
TORCH_SPEC ?= torch==2.13.0
CLUSTER_STATE ?= $(CURDIR)/.cluster
APT_PACKAGES := slurm-wlm slurmdbd munge mariadb-server openmpi-bin libopenmpi-dev
PYTEST_ARGS ?=

.PHONY: help deps install cluster-up cluster-down cluster-status demo demo-lm test test-fast bench bench-quick lint clean

help:
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

deps:  ## apt packages: Slurm, munge, MariaDB, Open MPI (skipped when all are installed)
	@dpkg -s $(APT_PACKAGES) >/dev/null 2>&1 || { export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update -q && apt-get install -y -q $(APT_PACKAGES); }

install: $(VENV)/.installed  ## virtualenv with hpcml (editable) and test tools

$(VENV)/.installed: setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC)
	# compat mode puts the checkout on sys.path, which Hydra needs to find hydra_plugins/ in an editable install.
	$(PY) -m pip install -q -e '.[test]' --config-settings editable_mode=compat
	touch $@

cluster-up: deps install  ## start the local 2-node Slurm cluster (idempotent)
	$(PY) -m hpcml.localcluster up --state-dir $(CLUSTER_STATE)

cluster-down:  ## stop it (state stays in .cluster/)
	$(PY) -m hpcml.localcluster down --state-dir $(CLUSTER_STATE)

cluster-status:  ## daemons and sinfo
	$(PY) -m hpcml.localcluster status --state-dir $(CLUSTER_STATE)

demo: cluster-up  ## a real 2 nodes x 2 ranks data-parallel job on the local cluster, followed to the end
	$(PY) jobs/train.py cluster=local launch.wait=true launch.poll_s=2

demo-lm: cluster-up  ## the byte-level transformer LM on 2 nodes x 2 ranks: validation perplexity, and where the outputs are
	$(PY) jobs/train.py +experiment=lm cluster=local launch.wait=true launch.poll_s=2 $(ARGS)

test: deps install cluster-up  ## every test, the real-cluster ones included
	$(PY) -m pytest -n 2 --dist loadgroup --durations=30 $(PYTEST_ARGS)

test-fast: deps install  ## unit and local-MPI tests; skips the slow real-cluster tests
	$(PY) -m pytest -m "not cluster" $(PYTEST_ARGS)

bench: cluster-up  ## every benchmark, full size (about 20 minutes on 2 cores): bench/results/*.json and summary.md
	$(PY) -m hpcml.bench

bench-quick: cluster-up  ## the same benchmarks, small and short (a few minutes)
	$(PY) -m hpcml.bench --quick

lint: install
	$(PY) -m ruff check hpcml hydra_plugins jobs tests examples

clean:
	rm -rf outputs/runs outputs/slurm-*.out .pytest_cache
