"""Train a model data-parallel, here or as a Slurm job.

    python jobs/train.py                                      # one process, right here
    mpirun -np 4 python jobs/train.py                         # 4 ranks on this machine (MPI bootstrap)
    python jobs/train.py cluster=local launch.wait=true       # 2 nodes x 2 ranks on the local Slurm cluster
    python jobs/train.py cluster=<site> cluster.nodes=4       # a real cluster: conf/cluster/<site>.yaml
    sbatch sbatch/train.sbatch                                # by hand: mpirun inside the allocation

Any key in conf/ can be overridden: `optim.lr=0.01 model.width=128 train.steps=500`.
"""

# ruff: noqa: E402  (the signal recorder goes in before the slow imports)

# First of all: a stop signal that reaches a starting rank is recorded, not fatal (no-op on a login node).
from hpcml.compute import early_signals

early_signals.install_if_launched()

# isort: split
import os
import sys

# The user's own modules (model._target_=my_project.models.Net) import from the directory the command runs
# in, as under `python -m`; on compute nodes the ranks start with -m from the submission directory too.
sys.path.insert(1, os.getcwd())

import hydra
from omegaconf import DictConfig

from hpcml.compute import step_record
from hpcml.compute.run_dir import register_resolvers
from hpcml.config import register_configs, validate
from hpcml.errors import HpcmlError, report_error
from hpcml.outputs import objective, read_objective, sweeper_needs_objective

register_configs()
register_resolvers()


def objective_needed() -> bool:
    """Only an optimizing sweeper (Optuna) reads what a run returns; a single run or a grid need not have
    the metric launch.objective names (a task of the user's own may not log test_accuracy)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    return hydra_cfg.mode == RunMode.MULTIRUN and sweeper_needs_objective(str(hydra_cfg.sweeper.get("_target_", "")))


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Returns the run's objective (launch.objective from result.json) where an optimizing sweeper reads it."""
    try:
        job_config = validate(cfg)
    except HpcmlError as err:
        step_record.mark_user_error()  # under sbatch/train.sbatch: a config error is not retried
        sys.exit(report_error(err))
    try:
        if job_config.cluster.submit:
            from hpcml.login.launch import submit, wait_for

            job = submit(job_config)
            if job is not None and job_config.launch.wait:
                result = wait_for(
                    job, job_config.train.output_dir, job_config.launch.poll_s, job_config.cluster.elastic
                )
                evaluated = ", ".join(f"{k} {v:.4f}" for k, v in result["metrics"].items())
                print(
                    f"finished: {result['steps']} steps on {result['num_nodes']} nodes x "
                    f"{result['world_size'] // result['num_nodes']} ranks, {evaluated or 'no eval data'}, "
                    f"replicas identical: {result['replicas_identical']}\n  outputs: {result['output_dir']}"
                )
                return objective(result, job_config.launch.objective) if objective_needed() else None
            return None
        from hpcml.compute.runtime import run_training

        code = run_training(job_config)
        if code != 0:
            sys.exit(code)  # a stopped or failed rank: its documented exit status
        return read_objective(job_config.train.output_dir, job_config.launch.objective) if objective_needed() else None
    except HpcmlError as err:
        sys.exit(report_error(err))


if __name__ == "__main__":
    main()
