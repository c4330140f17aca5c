"""Typed config schemas for a training job, registered with Hydra so a typo fails at submit time.

Each field carries a comment saying why it exists; `__post_init__` checks what a type cannot and raises
`ConfigError` with a sentence the user can act on. `validate()` turns Hydra's DictConfig into these
dataclasses, which runs every check, on the login node, before anything reaches Slurm.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from hpcml import components
from hpcml.errors import ConfigError
from hpcml.signal_names import parse_signal

BACKENDS = ("auto", "gloo", "nccl")
GRAD_SYNCS = ("ddp", "flat", "fsdp")
TRANSPORTS = ("auto", "torch", "mpi")
PRECISIONS = ("fp32", "bf16", "fp16")
FREED_HOST_MEMORY = ("auto", "return", "keep")
RESUME_MODES = ("auto", "none")
NCCL_DEBUG_LEVELS = ("", "VERSION", "WARN", "INFO", "TRACE")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    _require(value in allowed, f"{key}={value!r} is not one of {', '.join(allowed)}; pick one of those.")


@dataclass
class ClusterConfig:
    # Shown in logs and job names; 'none' trains right here, 'local' is the Makefile's cluster.
    name: str = "none"
    # True: the login-node process submits a Slurm job through submitit and returns. False: it trains itself
    # (alone, or as one rank of the mpirun/torchrun world it was started in).
    submit: bool = False
    # Site scheduling knobs, passed to sbatch as they are; None leaves the site default.
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    nodes: int = 1
    # Elastic requeue: with min_nodes below nodes the job asks Slurm for `--nodes=<min_nodes>-<nodes>`, so each
    # attempt (the first, and every one after a preemption) starts on as many nodes of that range as are free,
    # and training continues on the same global batch stream at that world size. None: exactly `nodes`.
    min_nodes: int | None = None
    tasks_per_node: int = 1
    cpus_per_task: int = 1
    # One rank per GPU is the rule for NCCL; 0 means a CPU job (gloo).
    gpus_per_node: int = 0
    mem_gb: int | None = None
    time_min: int = 60
    # srun starts one task per rank; with PMIx (--mpi=pmix) mpi4py in every task joins one MPI world.
    # --kill-on-bad-exit: a rank that dies takes the step down, so its peers cannot hang in a collective.
    srun_args: list[str] = field(default_factory=lambda: ["--mpi=pmix", "--kill-on-bad-exit=1"])
    # Shell lines run in the batch script before the ranks start (module load, conda activate, ...).
    setup: list[str] = field(default_factory=list)
    # Environment for every rank; OMP_NUM_THREADS=1 stops ranks sharing a node from oversubscribing it.
    env: dict[str, str] = field(default_factory=lambda: {"OMP_NUM_THREADS": "1"})
    # The network NCCL and Gloo use between nodes (NCCL_SOCKET_IFNAME, GLOO_SOCKET_IFNAME; e.g. ib0; ^lo,docker0
    # excludes, for NCCL only): on nodes with several interfaces they may otherwise pick one the other nodes
    # cannot reach, and the job hangs at its first collective until train.dist_timeout_s. None: their choice.
    network_interface: str | None = None
    # NCCL_DEBUG for GPU jobs: WARN has NCCL explain a failure (which peer, which link) in the rank logs and say
    # nothing otherwise; INFO to investigate a hang or slow start; "" leaves NCCL silent. cluster.env wins.
    nccl_debug: str = "WARN"
    # A step whose ranks die before they form their world, with no error from the job's config or code (an
    # MPI start-up crash), is relaunched in the same allocation up to this many times (batch_shell.sh).
    startup_retries: int = 2
    # A job that loses ranks to a signal or a failed node after training began (an OOM kill, a node crash),
    # with no error from its own code, requeues itself without that node and resumes, up to this many times
    # (0: it fails instead). The batch shell reads srun's report of which node it was (sbatch/train.sbatch
    # reads mpirun's, with HPCML_MAX_MIGRATIONS for this).
    max_migrations: int = 3

    def __post_init__(self) -> None:
        _require(
            re.fullmatch(r"[A-Za-z0-9_.-]+", self.name) is not None,
            f"cluster.name={self.name!r}: use letters, digits, '_', '.' and '-' only (it becomes the Slurm job name).",
        )
        for key in ("partition", "account", "qos", "constraint"):
            value = getattr(self, key)
            # These land in #SBATCH lines: a newline or quote there could start a line of shell.
            _require(
                value is None or re.fullmatch(r"[^\s'\"`$;\\]+", value) is not None,
                f"cluster.{key}={value!r}: no spaces, newlines, quotes, '$', ';' or backslashes allowed.",
            )
        _require(
            self.network_interface is None
            or re.fullmatch(r"[\^=]?[A-Za-z0-9_.:-]+(,[A-Za-z0-9_.:-]+)*", self.network_interface),
            f"cluster.network_interface={self.network_interface!r} is not an interface list NCCL reads: give names "
            "such as ib0 or eth0,eth1, or ^lo,docker0 to exclude some.",
        )
        _one_of("cluster.nccl_debug", self.nccl_debug, NCCL_DEBUG_LEVELS)
        for name in self.env:
            _require(
                re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) is not None,
                f"cluster.env key {name!r} is not a valid environment variable name.",
            )
        _require(
            self.nodes >= 1, f"cluster.nodes={self.nodes}: a job needs at least 1 node; set cluster.nodes=1 or more."
        )
        _require(
            self.min_nodes is None or 1 <= self.min_nodes <= self.nodes,
            f"cluster.min_nodes={self.min_nodes} must be between 1 and cluster.nodes={self.nodes} (the most nodes the "
            "job may get); or null for a job that always runs on cluster.nodes.",
        )
        _require(
            self.tasks_per_node >= 1,
            f"cluster.tasks_per_node={self.tasks_per_node}: each node runs at least 1 rank; set it to 1 or more.",
        )
        _require(
            self.startup_retries >= 0, f"cluster.startup_retries={self.startup_retries} cannot be negative (0: never)."
        )
        _require(
            self.max_migrations >= 0, f"cluster.max_migrations={self.max_migrations} cannot be negative (0: never)."
        )
        _require(self.cpus_per_task >= 1, f"cluster.cpus_per_task={self.cpus_per_task} must be 1 or more.")
        _require(self.gpus_per_node >= 0, f"cluster.gpus_per_node={self.gpus_per_node} cannot be negative.")
        _require(self.time_min >= 1, f"cluster.time_min={self.time_min}: Slurm needs a time limit of 1 minute or more.")
        if self.gpus_per_node:
            _require(
                self.tasks_per_node == self.gpus_per_node,
                f"cluster.tasks_per_node={self.tasks_per_node} but gpus_per_node={self.gpus_per_node}: "
                "hpcml runs one rank per GPU; set both to the same number.",
            )

    @property
    def world_size(self) -> int:
        """The most ranks the job runs on (all of cluster.nodes)."""
        return self.nodes * self.tasks_per_node

    @property
    def job_env(self) -> dict[str, str]:
        """What every rank's environment gets: the network and NCCL settings above, then cluster.env."""
        settings = {}
        if self.network_interface:
            settings["NCCL_SOCKET_IFNAME"] = self.network_interface
            # Gloo takes exact names only: an exclusion (^lo) or a prefix match (=eth) is NCCL's alone.
            if not self.network_interface.startswith(("^", "=")):
                settings["GLOO_SOCKET_IFNAME"] = self.network_interface
        if self.gpus_per_node and self.nccl_debug:
            settings["NCCL_DEBUG"] = self.nccl_debug
        return settings | self.env

    @property
    def elastic(self) -> bool:
        return self.min_nodes is not None and self.min_nodes < self.nodes

    @property
    def node_counts(self) -> range:
        """Every number of nodes an attempt of this job may run on."""
        return range(self.min_nodes if self.elastic else self.nodes, self.nodes + 1)


@dataclass
class LaunchConfig:
    # Block until the submitted job ends and print its result (make demo). The default returns as soon as
    # Slurm accepts the job, so a login shell is never held hostage.
    wait: bool = False
    # Seconds between state polls while waiting.
    poll_s: float = 5.0
    # Print the sbatch script(s) that would be submitted, and submit nothing.
    dry_run: bool = False
    # How many trials of a sweep's job array may run at once (sbatch --array=...%N).
    array_parallelism: int = 256
    # The result.json value each run hands back to Hydra: what an optimizing sweeper (Optuna) optimizes
    # (its direction is the sweeper's own setting). A sweep that needs it waits for its trials.
    objective: str = "test_accuracy"
    # Check every `_target_` against its callable's signature before submitting (hpcml/components.py). false:
    # only that each is a `_target_` node, for a module that imports on the compute nodes alone (a CUDA-only
    # extension); a bad argument then fails the job when the ranks build it, with the same message.
    check_components: bool = True

    def __post_init__(self) -> None:
        _require(self.poll_s > 0, f"launch.poll_s={self.poll_s} must be positive.")
        _require(self.array_parallelism >= 1, f"launch.array_parallelism={self.array_parallelism} must be 1 or more.")


# User components (hpcml/components.py): Hydra `_target_` nodes, a callable's import path and its keyword
# arguments, built on every rank. These are the built-in choices, the same as conf/<group>/<name>.yaml; a
# config that leaves a component out (a TrainJobConfig built in Python) gets the first of each.
BUILTIN_MODEL = {"_target_": "hpcml.compute.models.MLP", "input_dim": 64, "num_classes": 10, "width": 64, "depth": 2}
BUILTIN_DATA = {
    # Facts about the data that other components interpolate (the MLP's ${data.input_dim}).
    "input_dim": 64,
    "num_classes": 10,
    "train": {"_target_": "hpcml.compute.datasets.digits", "split": "train"},
    "eval": {"_target_": "hpcml.compute.datasets.digits", "split": "test"},
}
BUILTIN_OPTIM = {"_target_": "torch.optim.SGD", "lr": 0.05, "momentum": 0.9}
BUILTIN_TASK = {"_target_": "hpcml.compute.tasks.Classification"}
# What hpcml passes positionally to each: the optimizer gets the parameters, the schedule the optimizer.
SUPPLIED_ARGUMENTS = {"model": 0, "optim": 1, "schedule": 1, "task": 0}
# Keys that no longer exist, with what replaced them: a stale command line gets the new spelling.
RENAMED = {
    "optim.name": "the optimizer is a config group or a class now: optim=adam, or optim._target_=torch.optim.RMSprop",
    "optim.schedule": "the LR schedule is its own config group: schedule=cosine",
    "data.name": "the dataset is a config group now: data=synthetic, data=npz data.path=...",
}


def _component(value: dict[str, Any] | None, builtin: dict[str, Any]) -> dict[str, Any]:
    """The node a config gives for a component: None is the built-in; a node without `_target_` adjusts the
    built-in's arguments ({"lr": 0.5} for the optimizer), as `optim.lr=0.5` does on a command line."""
    if value is None:
        # A copy: the built-ins are shared module constants, and a config's nodes are changed in place (sweeps).
        return copy.deepcopy(builtin)
    if isinstance(value, dict) and components.TARGET not in value and "train" not in value:
        return _merged(builtin, value)
    return value


def _merged(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in changes.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _check_components(cfg: TrainJobConfig) -> None:
    for old, hint in RENAMED.items():
        section, _, name = old.partition(".")
        if name in (getattr(cfg, section) or {}):
            raise ConfigError(f"{old} is gone: {hint}.")
    for key, supplied in SUPPLIED_ARGUMENTS.items():
        node = getattr(cfg, key)
        if node is None:  # only the schedule may be absent: a constant learning rate
            continue
        components.check(key, node, supplied, signature=cfg.launch.check_components)
    data = cfg.data
    if not isinstance(data, dict) or "train" not in data:
        raise ConfigError(
            "data needs data.train: a _target_ node that builds the training Dataset (and, optionally, data.eval). "
            "Pick a built-in (data=digits) or see the README's 'Train your own model'."
        )
    for name in ("train", "eval"):
        node = data.get(name)
        if node is None:
            continue
        components.check(f"data.{name}", node, signature=cfg.launch.check_components)
        # The built-in file reader's file is checked here, where a missing one costs no queue wait.
        if node[components.TARGET] == "hpcml.compute.datasets.npz":
            _require(
                Path(str(node.get("path"))).is_file(),
                f"data.{name}.path={node.get('path')} does not exist; give a file every node can read (a shared "
                "filesystem path).",
            )


@dataclass
class TrainConfig:
    steps: int = 300
    # The global batch is split evenly across ranks, so the run means the same thing at any world size.
    global_batch_size: int = 64
    seed: int = 0
    log_every: int = 10
    # Samples per forward when the task evaluates the eval dataset (every rank alike).
    eval_batch_size: int = 1024
    # Evaluate every N steps as well as at the end (0: only at the end); the metrics go to metrics.jsonl.
    eval_every_steps: int = 0
    # Gradient accumulation: each rank's share of a step's global batch goes through forward and backward in
    # this many equal micro-batches, and gradients are averaged across ranks once, after the last. The same
    # samples and average gradient as with 1 (BatchNorm aside: it sees the smaller batches), in less memory.
    grad_accum_steps: int = 1
    # Clip the gradients' global L2 norm to this before each optimizer step, and log the norm (0: off).
    clip_grad_norm: float = 0.0
    # fp32; bf16 (autocast, for GPUs that have it); fp16 (autocast and a checkpointed loss scaler).
    precision: str = "fp32"
    # torch.compile the model (the first steps pay the compilation).
    compile: bool = False
    # auto: nccl when CUDA is there (one GPU per rank), gloo otherwise.
    backend: str = "auto"
    # How the ranks share the training. Replicated (each rank holds the whole model): ddp, torch's
    # DistributedDataParallel (bucketed all-reduces overlap backward), or flat (all gradients in one buffer,
    # summed by one all-reduce after backward). Sharded: fsdp, torch's FSDP2 (parameters, gradients and
    # optimizer state split across the ranks, for models too big for one; checkpoints are sharded too).
    grad_sync: str = "ddp"
    # fsdp: free each unit's gathered parameters after its forward (least memory; backward gathers them
    # again) or keep them until backward (one all-gather fewer per unit and step, more memory).
    fsdp_reshard_after_forward: bool = True
    # DDP's gradient bucket size and whether grads alias the buckets (saves a copy per step).
    ddp_bucket_cap_mb: float = 25.0
    gradient_as_bucket_view: bool = True
    # What carries the gradient all-reduces: torch (the process group: gloo or nccl), mpi (mpi4py), or auto
    # (time both once per job on this job's ranks, and give each buffer size the faster; torch on GPUs and
    # without an MPI launcher).
    transport: str = "auto"
    # A collective that waits longer than this fails instead of hanging the job.
    dist_timeout_s: int = 300
    # Python's garbage collector runs every N steps on every rank at once, not whenever one rank's allocations
    # cross a threshold (a full collection pauses that rank, and every collective waits for it); 0: Python's
    # automatic collection. Only reference cycles wait for it (the rest is freed at once): up to N steps, or 10N
    # for a cycle that lived through two collections first. Lower it, or 0, if a model's cycles hold memory.
    gc_every_steps: int = 50
    # Large blocks of host memory a rank frees (FSDP's gathered parameters, every step on CPUs): return (to the
    # OS at once: a sharded rank then peaks lower) or keep (glibc's default: reused, faster steps, but FSDP on
    # CPUs then peaked above DDP). auto: return for fsdp on CPUs, keep otherwise. A threshold set in the
    # environment (MALLOC_MMAP_THRESHOLD_ and the like, hpcml/compute/host_memory.py) wins.
    freed_host_memory: str = "auto"
    # Where rank 0 writes metrics, logs and results; the Hydra run directory by default.
    output_dir: str = "outputs/manual"

    def __post_init__(self) -> None:
        _require(self.steps >= 1, f"train.steps={self.steps} must be 1 or more.")
        _require(self.global_batch_size >= 1, f"train.global_batch_size={self.global_batch_size} must be 1 or more.")
        _require(self.log_every >= 1, f"train.log_every={self.log_every} must be 1 or more.")
        _require(self.eval_batch_size >= 1, f"train.eval_batch_size={self.eval_batch_size} must be 1 or more.")
        _require(self.eval_every_steps >= 0, f"train.eval_every_steps={self.eval_every_steps} cannot be negative.")
        _require(self.grad_accum_steps >= 1, f"train.grad_accum_steps={self.grad_accum_steps} must be 1 or more.")
        _require(
            self.global_batch_size % self.grad_accum_steps == 0,
            f"train.global_batch_size={self.global_batch_size} does not split into train.grad_accum_steps="
            f"{self.grad_accum_steps} equal micro-batches; make it a multiple of {self.grad_accum_steps}.",
        )
        _require(
            self.dist_timeout_s >= 1,
            f"train.dist_timeout_s={self.dist_timeout_s} must be 1 or more (seconds a collective may wait).",
        )
        _require(
            self.gc_every_steps >= 0,
            f"train.gc_every_steps={self.gc_every_steps} cannot be negative (0: Python's automatic collection).",
        )
        _require(self.clip_grad_norm >= 0, f"train.clip_grad_norm={self.clip_grad_norm} cannot be negative (0: off).")
        _one_of("train.precision", self.precision, PRECISIONS)
        _one_of("train.freed_host_memory", self.freed_host_memory, FREED_HOST_MEMORY)
        _one_of("train.backend", self.backend, BACKENDS)
        _require(
            self.grad_sync != "mpi",
            "train.grad_sync=mpi is now spelled train.grad_sync=flat train.transport=mpi (one flat gradient buffer, "
            "summed by MPI); with train.transport=auto each job takes the faster of MPI and torch.distributed.",
        )
        _one_of("train.grad_sync", self.grad_sync, GRAD_SYNCS)
        _one_of("train.transport", self.transport, TRANSPORTS)
        if self.grad_sync == "fsdp":
            _require(
                self.transport != "mpi",
                "train.transport=mpi carries all-reduces of replicated gradients; train.grad_sync=fsdp reduce-scatters "
                "sharded ones over the process group. Use train.transport=auto or torch with fsdp.",
            )
            _require(
                self.precision != "fp16",
                "train.precision=fp16 needs a loss scaler, which hpcml does not run over sharded gradients; with "
                "train.grad_sync=fsdp use train.precision=bf16 (no scaler needed) or fp32.",
            )


LOADER_CONTEXTS = ("fork", "forkserver", "spawn")


@dataclass
class LoaderConfig:
    # How the samples of a Dataset reach the loop (hpcml/compute/loader.py). In-memory tensors (a
    # TensorDataset) with no workers are indexed a batch at a time and need none of this.
    # Worker processes reading samples in the background; 0 reads them in the rank itself.
    num_workers: int = 0
    # Batches each worker reads ahead (None: torch's default, 2).
    prefetch_factor: int | None = None
    # Page-locked host batches, copied to the GPU without a staging copy (GPU jobs only).
    pin_memory: bool = True
    persistent_workers: bool = False
    # How workers start: fork (Linux's default, fastest), forkserver or spawn (for libraries that break
    # across a fork); None is torch's default.
    multiprocessing_context: str | None = None
    # A worker that takes longer than this to deliver a batch fails the job instead of hanging it (0: never).
    timeout_s: float = 300.0
    # Combines a batch's samples; None is torch's default_collate. A `_target_` node with `_partial_: true`.
    collate_fn: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        _require(self.num_workers >= 0, f"loader.num_workers={self.num_workers} cannot be negative (0: no workers).")
        _require(
            self.prefetch_factor is None or self.prefetch_factor >= 1,
            f"loader.prefetch_factor={self.prefetch_factor} must be 1 or more (or null for torch's default).",
        )
        _require(
            self.prefetch_factor is None or self.num_workers > 0,
            f"loader.prefetch_factor={self.prefetch_factor} needs loader.num_workers > 0: only workers read ahead.",
        )
        if self.multiprocessing_context is not None:
            _one_of("loader.multiprocessing_context", self.multiprocessing_context, LOADER_CONTEXTS)
        _require(self.timeout_s >= 0, f"loader.timeout_s={self.timeout_s} cannot be negative (0: never time out).")
        if self.collate_fn is not None:
            components.check("loader.collate_fn", self.collate_fn)


@dataclass
class CheckpointConfig:
    # Where step-<N> folders go; default <train.output_dir>/checkpoints. Every node must see it.
    dir: str | None = None
    # Periodic saves bound the work a crash can lose; 0 turns a trigger off. Preemption and time limits
    # always save, whatever these say.
    every_steps: int = 0
    every_minutes: float = 0.0
    # Older verified checkpoints beyond this many are deleted after each commit.
    keep_last: int = 3
    # Copy the state to CPU at the step boundary and write it on a background thread (rank 0; every rank for
    # a sharded checkpoint).
    async_save: bool = False
    # auto: resume from the newest verified checkpoint if there is one; none: start fresh;
    # or the path of one step-<N> folder to start from.
    resume: str = "auto"

    def __post_init__(self) -> None:
        _require(
            self.every_steps >= 0, f"checkpoint.every_steps={self.every_steps} cannot be negative (0 turns it off)."
        )
        _require(self.every_minutes >= 0, f"checkpoint.every_minutes={self.every_minutes} cannot be negative.")
        _require(self.keep_last >= 1, f"checkpoint.keep_last={self.keep_last}: keep at least 1 checkpoint.")
        if self.resume not in RESUME_MODES:
            _require(
                (Path(self.resume) / "manifest.json").is_file(),
                f"checkpoint.resume={self.resume} is neither auto, none, nor a step-<N> folder holding a manifest.json.",
            )


@dataclass
class PreemptConfig:
    # The warning Slurm sends before the time limit (sbatch --signal). Never USR1: NCCL may use it.
    # SIGTERM (preemption, scancel, requeue) is always handled too.
    signal: str = "USR2"
    # How long before the time limit Slurm sends it. Slurm checks every 30 s, so it may come up to a minute early.
    # 0 sends no warning at all: the run then stops on its own clock alone (deadline_margin_s below).
    signal_lead_s: int = 120
    # Requeue the job after saving, so it resumes by itself; false just saves and exits.
    requeue: bool = True
    # Past this many restarts the job fails with a clear reason instead of requeueing again.
    max_requeues: int = 20
    # Stop this much earlier than save time alone requires before the time limit, as slack.
    deadline_margin_s: float = 30.0

    def __post_init__(self) -> None:
        try:
            sig = parse_signal(self.signal)
        except ValueError:
            raise ConfigError(f"preempt.signal={self.signal!r} is not a signal name; use USR2 (the default).") from None
        _require(
            sig.name != "SIGUSR1", "preempt.signal=USR1 may collide with NCCL's own use of SIGUSR1; use USR2 or URG."
        )
        _require(sig.name not in ("SIGKILL", "SIGSTOP"), f"preempt.signal={self.signal} cannot be caught; use USR2.")
        _require(self.signal_lead_s >= 0, f"preempt.signal_lead_s={self.signal_lead_s} cannot be negative.")
        _require(self.max_requeues >= 0, f"preempt.max_requeues={self.max_requeues} cannot be negative.")


@dataclass
class FaultConfig:
    # Deliberate failures for drills and tests: prove that one failing rank ends the whole job promptly,
    # and that a process killed in the middle of a save leaves the previous checkpoint intact.
    raise_at_step: int | None = None
    # Rank `rank` stops answering at this step (sleeps for good, as a rank stuck in I/O or a driver does):
    # its peers' next collective must fail after train.dist_timeout_s instead of hanging.
    hang_at_step: int | None = None
    # SIGKILL in the middle of the save at this step (first attempt only): rank 0 of a replicated save, rank
    # `rank` of a sharded one (once its shard is on disk, before the commit).
    kill_during_save_at_step: int | None = None
    rank: int = 0
    # Slow each step down (seconds), so that tests can interrupt a run at a chosen moment.
    step_sleep_s: float = 0.0
    # Fail (on every rank, after the first step) while this file exists: a transient failure, like a bad
    # node or a full disk, that a later `hpcml resume` gets past once it is gone.
    raise_if_file_exists: str | None = None
    # Rank `rank` dies of SIGSEGV before joining the world in the first N launches of each attempt's step: a
    # stand-in for an MPI start-up crash, which the batch shell relaunches (cluster.startup_retries).
    crash_at_start_launches: int = 0
    # Every rank pauses (8 s) between the first and second micro-batch of this step, logging it, so that a
    # test can interrupt in the middle of a step (train.grad_accum_steps > 1).
    pause_between_micro_batches_at_step: int | None = None
    # At the end of each of these steps every rank waits, logging it, until a signal reaches it (3 minutes at
    # most, and under half of train.dist_timeout_s): a test's interrupt then lands at a known step however long
    # Slurm takes to deliver it.
    hold_for_signal_at_steps: list[int] = field(default_factory=list)


@dataclass
class TrainJobConfig:
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    # The user components (see BUILTIN_*): None means the built-in; schedule None means a constant LR.
    model: dict[str, Any] | None = None
    data: dict[str, Any] | None = None
    optim: dict[str, Any] | None = None
    schedule: dict[str, Any] | None = None
    task: dict[str, Any] | None = None
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    preempt: PreemptConfig = field(default_factory=PreemptConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)

    def __post_init__(self) -> None:
        self.model = _component(self.model, BUILTIN_MODEL)
        self.data = _component(self.data, BUILTIN_DATA)
        self.optim = _component(self.optim, BUILTIN_OPTIM)
        self.task = _component(self.task, BUILTIN_TASK)
        _check_components(self)
        _require(
            not self.train.eval_every_steps or self.data.get("eval") is not None,
            f"train.eval_every_steps={self.train.eval_every_steps} needs an eval dataset, and data.eval is null; "
            "give one (data.eval._target_=...), or set train.eval_every_steps=0.",
        )
        _require(
            self.fault.pause_between_micro_batches_at_step is None or self.train.grad_accum_steps > 1,
            "fault.pause_between_micro_batches_at_step needs train.grad_accum_steps of 2 or more: with one "
            "micro-batch a step has no in-between.",
        )
        if self.cluster.submit:
            for nodes in self.cluster.node_counts:
                self._check_batch_splits(nodes)

    def _check_batch_splits(self, nodes: int) -> None:
        """The global batch must split evenly over the ranks of `nodes` nodes, and each share into micro-batches."""
        world = nodes * self.cluster.tasks_per_node
        on = f"{world} ranks ({nodes} nodes x {self.cluster.tasks_per_node})"
        if self.cluster.elastic:
            on += f", which the job runs on when Slurm gives it {nodes} of its {self.cluster.min_nodes}-{self.cluster.nodes} nodes"
        _require(
            self.train.global_batch_size % world == 0,
            f"train.global_batch_size={self.train.global_batch_size} does not split evenly over {on}; make it a "
            f"multiple of {world}" + (", or narrow cluster.min_nodes..cluster.nodes." if self.cluster.elastic else "."),
        )
        parts = world * self.train.grad_accum_steps
        _require(
            self.train.global_batch_size % parts == 0,
            f"train.global_batch_size={self.train.global_batch_size} over {on} does not split into "
            f"train.grad_accum_steps={self.train.grad_accum_steps} equal micro-batches; make it a multiple of {parts}.",
        )


def register_configs() -> None:
    """Make the schema the base of conf/train.yaml, so unknown keys and wrong types fail in Hydra."""
    ConfigStore.instance().store(name="train_schema", node=TrainJobConfig)


@functools.lru_cache(maxsize=1)
def _schema() -> DictConfig:
    """The structured schema, built once: building it takes longer than a whole validation (sweeps validate
    every trial). OmegaConf.merge copies its first argument, so the cached one is never changed."""
    return OmegaConf.structured(TrainJobConfig)


def validate(cfg: DictConfig | dict[str, Any]) -> TrainJobConfig:
    """Resolve and check a config; every problem comes back as one ConfigError naming the key."""
    with _as_config_errors():
        merged = OmegaConf.merge(_schema(), cfg)
        return OmegaConf.to_object(merged)  # builds the dataclasses, which runs every __post_init__


@contextlib.contextmanager
def _as_config_errors() -> Iterator[None]:
    """OmegaConf's errors (a wrong type, an unknown key) and our checks' own, as one ConfigError."""
    try:
        yield
    except ConfigError:
        raise
    except OmegaConfBaseException as err:
        cause = err.__cause__
        if isinstance(cause, ConfigError):
            raise cause from None
        raise ConfigError(f"invalid config: {err}") from err


_SECTIONS = tuple(f.name for f in fields(TrainJobConfig))


def with_values(cfg: TrainJobConfig, values: dict[str, Any]) -> TrainJobConfig:
    """`cfg` with the dotted keys in `values` set, checked as `validate` checks them: each touched section
    is rebuilt through its own schema (type conversion, its __post_init__), then the whole config's checks
    run again. A sweep's trials differ from the first in a value or two; re-validating all of every trial
    cost 3-4 ms each, this about 1 ms. A bad value raises ConfigError naming its key."""
    sections: dict[str, DictConfig] = {}
    with _as_config_errors():
        for key, value in values.items():
            section, _, rest = key.partition(".")
            if not rest or section not in _SECTIONS:
                raise ConfigError(f"{key}: not a key of a config section ({', '.join(_SECTIONS)}), e.g. optim.lr.")
            if section not in sections:
                sections[section] = OmegaConf.structured(getattr(cfg, section))
            try:
                OmegaConf.update(sections[section], rest, value, merge=True)
            except OmegaConfBaseException as err:  # named by its key in the section: say the whole key
                raise ConfigError(f"{key}={value!r}: {str(err).splitlines()[0]}") from None
        return replace(cfg, **{name: OmegaConf.to_object(node) for name, node in sections.items()})


def to_plain_dict(cfg: TrainJobConfig) -> dict[str, Any]:
    """A picklable, resolved copy of the config to ship to the compute nodes. (A validated config holds
    only plain values, so dataclasses.asdict gives what OmegaConf would, about 100x faster: it runs
    twice per trial of a sweep.)"""
    return asdict(cfg)
