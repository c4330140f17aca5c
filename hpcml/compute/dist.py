"""torch.distributed up and down: who each rank is, rendezvous without user input, backend and device.

MPI (when the launcher gave us one) is the source of truth for rank and world size, and carries the
rendezvous: rank 0 opens the TCPStore on a free port and broadcasts its address, so no port is ever
guessed. MASTER_ADDR/MASTER_PORT from the environment win when both are set.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from hpcml.compute import mpi
from hpcml.compute.env import LauncherEnvironment, ProcessPlacement
from hpcml.errors import ConfigError, RendezvousError

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class DistributedContext:
    """Everything a rank needs to know about the job it is part of."""

    placement: ProcessPlacement
    backend: str
    device: torch.device
    launcher: str
    uses_mpi: bool

    @property
    def rank(self) -> int:
        return self.placement.rank

    @property
    def world_size(self) -> int:
        return self.placement.world_size

    @property
    def is_main(self) -> bool:
        return self.placement.rank == 0


def broadcast_from_rank0(value: T, ctx: DistributedContext) -> T:
    """Rank 0's `value` (any picklable object), on every rank; a collective: every rank calls it."""
    box = [value]
    if ctx.world_size > 1:
        dist.broadcast_object_list(box, src=0)
    return box[0]


def same_on_every_rank(value: T, what: str, ctx: DistributedContext) -> T:
    """`value`, checked equal on every rank (a collective): a node whose files, environment or code differ
    (another Python, another copy of the data) is refused before it trains on something else."""
    values = [value]
    if ctx.world_size > 1:
        values = [None] * ctx.world_size
        dist.all_gather_object(values, value)
    if any(v != values[0] for v in values):
        shown = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
        raise ConfigError(
            f"{what} differs between ranks ({shown}); every node must see the same data and code (a shared "
            "filesystem, the same environment)."
        )
    return value


def select_backend(requested: str, cuda_available: bool) -> str:
    """nccl when CUDA is there, gloo otherwise; an explicit request is honoured or refused clearly."""
    if requested == "auto":
        return "nccl" if cuda_available else "gloo"
    if requested == "nccl" and not cuda_available:
        raise ConfigError(
            "train.backend=nccl but CUDA is not available on this node; ask for GPUs "
            "(cluster.gpus_per_node) or use train.backend=gloo."
        )
    return requested


def select_device(backend: str, placement: ProcessPlacement, cuda_device_count: int) -> torch.device:
    """Bind each rank to its own GPU under NCCL; CPU otherwise."""
    if backend != "nccl":
        return torch.device("cpu")
    if cuda_device_count == 1:
        # The site already bound one GPU per task (e.g. --gpu-bind=single:1): it is always device 0.
        return torch.device("cuda", 0)
    if cuda_device_count < placement.local_world_size:
        raise ConfigError(
            f"{placement.local_world_size} ranks on this node but only {cuda_device_count} GPUs visible; "
            "set cluster.tasks_per_node equal to cluster.gpus_per_node."
        )
    return torch.device("cuda", placement.local_rank)


def placement_from_mpi(env: LauncherEnvironment, expected: ProcessPlacement) -> ProcessPlacement:
    """Rank, size and node layout as MPI sees them, checked against what the launcher said."""
    world = mpi.world()
    if world.size != expected.world_size:
        raise RendezvousError(
            f"{env.name} started {expected.world_size} tasks but MPI sees a world of {world.size}. "
            "Under srun the tasks join one MPI world only with srun --mpi=pmix "
            "(cluster.srun_args); check `srun --mpi=list` on this cluster."
        )
    names = world.allgather(env.node_name())
    nodes = list(dict.fromkeys(names))  # node order = order of first rank on it
    me = names[world.rank]
    return ProcessPlacement(
        rank=world.rank,
        world_size=world.size,
        local_rank=names[: world.rank].count(me),
        local_world_size=names.count(me),
        node_rank=nodes.index(me),
        num_nodes=len(nodes),
    )


def _reachable_address() -> str:
    """An address of this host that other nodes can reach: the first non-loopback one, else loopback."""
    host = socket.gethostname()
    try:
        infos = socket.getaddrinfo(host, None, socket.AF_INET)
    except socket.gaierror:
        return "127.0.0.1"
    addresses = [info[4][0] for info in infos]
    public = [a for a in addresses if not a.startswith("127.")]
    return (public or addresses or ["127.0.0.1"])[0]


def _store_from_environment(placement: ProcessPlacement, timeout: datetime.timedelta) -> dist.Store:
    addr, port = os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]
    try:
        return dist.TCPStore(addr, int(port), placement.world_size, placement.rank == 0, timeout=timeout)
    except (RuntimeError, ValueError) as err:
        raise RendezvousError(f"cannot rendezvous at MASTER_ADDR={addr} MASTER_PORT={port}: {err}") from err


def _store_over_mpi(placement: ProcessPlacement, timeout: datetime.timedelta) -> dist.Store:
    world = mpi.world()
    store = None
    offer: tuple[str, int, str | None]
    if placement.rank == 0:
        addr = _reachable_address()
        try:
            # Port 0: the OS picks a free port and the store keeps it bound, so no other job can take it.
            store = dist.TCPStore(addr, 0, placement.world_size, True, timeout=timeout, wait_for_workers=False)
            offer = (addr, store.port, None)
        except RuntimeError as err:
            offer = (addr, 0, str(err))
    # Every rank learns the outcome, including rank 0's failure, so nobody waits on a store that never opens.
    offer = world.broadcast(offer if placement.rank == 0 else None)
    addr, port, error = offer
    if error:
        raise RendezvousError(f"rank 0 could not open a rendezvous store on {addr}: {error}")
    if store is None:
        store = dist.TCPStore(addr, port, placement.world_size, False, timeout=timeout)
    log.debug("rendezvous at %s:%d", addr, port)
    return store


def make_store(env: LauncherEnvironment, placement: ProcessPlacement, timeout: datetime.timedelta) -> dist.Store:
    if "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:
        return _store_from_environment(placement, timeout)
    if placement.world_size == 1:
        return dist.HashStore()
    if env.uses_mpi:
        return _store_over_mpi(placement, timeout)
    raise RendezvousError(
        f"{env.name} gave no MASTER_ADDR/MASTER_PORT and no MPI world to rendezvous over; "
        "launch with mpirun or srun --mpi=pmix, or export MASTER_ADDR and MASTER_PORT."
    )


def setup_distributed(env: LauncherEnvironment, requested_backend: str, timeout_s: int) -> DistributedContext:
    placement = env.placement()
    if env.uses_mpi:
        placement = placement_from_mpi(env, placement)
    backend = select_backend(requested_backend, torch.cuda.is_available())
    device = select_device(backend, placement, torch.cuda.device_count() if backend == "nccl" else 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=timeout_s)
    store = make_store(env, placement, timeout)
    if backend == "nccl":
        refuse_shared_gpu(store, placement, env.node_name(), device)
        require_nccl_error_handling(os.environ)
    kwargs = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(
        backend, store=store, rank=placement.rank, world_size=placement.world_size, timeout=timeout, **kwargs
    )
    return DistributedContext(placement, backend, device, env.name, env.uses_mpi)


def require_nccl_error_handling(environ: MutableMapping[str, str]) -> None:
    """A collective that outlives train.dist_timeout_s must end the process (torch's default, mode 3), so that a
    peer that hangs or vanished fails the job instead of holding its GPUs for ever; a site profile that turned
    that off (0) is overridden, saying so."""
    if environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING") == "0":
        log.warning("TORCH_NCCL_ASYNC_ERROR_HANDLING=0 would let a hung NCCL collective hang the job; using 3")
        environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "3"


def gpu_sharing_ranks(store: dist.Store, placement: ProcessPlacement, node: str, gpu_id: str) -> list[int]:
    """The global ranks on this node whose GPU is `gpu_id` (this rank's), via the rendezvous store.

    Each rank publishes its GPU's UUID under its node and local rank, then reads its node's peers: a few
    store round trips per rank, only on nodes with more than one rank.
    """
    key = "hpcml/gpu/{}/{}".format
    store.set(key(node, placement.local_rank), f"{placement.rank} {gpu_id}")
    sharing = []
    for local_rank in range(placement.local_world_size):
        rank, peer_gpu = store.get(key(node, local_rank)).decode().split(" ", 1)
        if peer_gpu == gpu_id:
            sharing.append(int(rank))
    return sorted(sharing)


def refuse_shared_gpu(store: dist.Store, placement: ProcessPlacement, node: str, device: torch.device) -> None:
    """NCCL refuses two ranks on one GPU with "Duplicate GPU detected", which names neither the cause (more
    ranks on a node than GPUs, or every task given the same GPU) nor the fix; say both before it does."""
    if placement.local_world_size < 2:
        return
    gpu = torch.cuda.get_device_properties(device)
    sharing = gpu_sharing_ranks(store, placement, node, str(gpu.uuid))
    if len(sharing) > 1:
        raise ConfigError(
            f"ranks {', '.join(map(str, sharing))} on node {node} would all use GPU {gpu.uuid} ({gpu.name}), and "
            f"NCCL needs a GPU of its own for every rank: start one rank per GPU on each node (e.g. srun "
            f"--ntasks-per-node=<GPUs per node> --gpus-per-task=1, or mpirun -np <GPUs>), or train on CPUs with "
            f"train.backend=gloo."
        )


def teardown_distributed() -> None:
    """Leave together: rank 0 hosts the rendezvous store, and a peer whose store vanishes while it is
    still tearing down dies in C++ ("terminate called without an active exception")."""
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()
