"""The baseline for start-up time: what a user writes without hpcml, started by the same `mpirun`.

Rank and world size from Open MPI's variables, MASTER_ADDR/MASTER_PORT from the environment, gloo, the
same MLP under DDP, one step on random data. Rank 0 writes the unix time its first step finished.
Deliberately minimal: no config system, no data loading, no checkpoints, no signals, no teardown.
"""

import json
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def main() -> None:
    rank = int(os.environ.get("OMPI_COMM_WORLD_RANK", "0"))
    world = int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1"))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    ddp = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    F.cross_entropy(ddp(x), y).backward()
    optimizer.step()
    first_step_at = time.time()
    if rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump({"first_step_at": first_step_at}, f)
    dist.barrier()
    # No teardown: the TCPStore host leaving while a peer's threads still use it can abort a rank at exit
    # ("terminate called without an active exception"), which hpcml's runtime prevents with barriers around
    # destroy_process_group and a bare script does not. The timing is written; leave now.
    os._exit(0)


if __name__ == "__main__":
    main()
