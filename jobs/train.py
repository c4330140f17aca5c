"""Train a model data-parallel, here or as a Slurm job.

    python jobs/train.py                                      # one process, right here
    mpirun -np 4 python jobs/train.py                         # 4 ranks on this machine (MPI bootstrap)
    python jobs/train.py cluster=local launch.wait=true       # 2 nodes x 2 ranks on the local Slurm cluster
    python jobs/train.py cluster=<site> cluster.nodes=4       # a real cluster: conf/cluster/<site>.yaml
    sbatch sbatch/train.sbatch                                # by hand: mpirun inside the allocation

Any key in conf/ can be overridden: `optim.lr=0.01 model.width=128 train.steps=500`.
"""

# First of all: inside a job, importing hpcml starts recording early warning signals (hpcml.early_signals).
import hpcml  # noqa: F401

# isort: split
import json
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from hpcml.config import register_configs, register_resolvers, validate
from hpcml.errors import HpcmlError
from hpcml.outputs import RESULT_FILE
from hpcml.sweep import objective

register_configs()
register_resolvers()


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Returns the run's objective (launch.objective from result.json), which optimizing sweepers read."""
    try:
        job_config = validate(cfg)
        if job_config.cluster.submit:
            from hpcml.launch import submit, wait_for

            job = submit(job_config)
            if job is not None and job_config.launch.wait:
                result = wait_for(job, job_config.train.output_dir, job_config.launch.poll_s)
                print(
                    f"finished: {result['steps']} steps on {result['num_nodes']} nodes x "
                    f"{result['world_size'] // result['num_nodes']} ranks, test accuracy {result['test_accuracy']:.4f}, "
                    f"replicas identical: {result['replicas_identical']}\n  outputs: {result['output_dir']}"
                )
                return objective(result, job_config.launch.objective)
            return None
        from hpcml.runtime import run_training

        code = run_training(job_config)
        if code != 0:
            sys.exit(code)  # a stopped or failed rank: its documented exit status
        result_path = Path(job_config.train.output_dir) / RESULT_FILE
        return (
            objective(json.loads(result_path.read_text()), job_config.launch.objective)
            if result_path.exists()
            else None
        )
    except HpcmlError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
