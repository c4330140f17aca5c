"""What a finished run leaves behind: result.json (with every rank's parameter checksum) and model.pt, the
whole model (gathered from its shards under FSDP)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist

from hpcml.compute.dist import DistributedContext, broadcast_from_rank0
from hpcml.compute.fsdp import is_sharded, whole_model_state
from hpcml.errors import ReplicasDivergedError
from hpcml.fileio import write_atomically
from hpcml.outputs import MODEL_FILE, RESULT_FILE


@dataclass
class TrainingResult:
    steps: int
    final_loss: float
    # What the task's evaluate() returned (classification: test_accuracy, test_loss); {} without data.eval.
    metrics: dict[str, float]
    # SHA-256 of the parameters (write_result fills it in): equal on every replica, or of the whole sharded model.
    params_sha256: str
    world_size: int
    num_nodes: int
    backend: str
    grad_sync: str
    launcher: str
    samples_per_s: float
    elapsed_s: float
    output_dir: str
    resumed_from_step: int | None
    # The all-reduce transport per buffer size (bytes -> torch|mpi) when hpcml chose it (auto); else None.
    transport_plan: dict[str, str] | None = None
    # Unix time at which this process finished its first training step (start-up and resume benchmarks).
    first_step_at: float | None = None


def parameters_checksum(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter's bytes in order: equal on all ranks iff the replicas are identical."""
    return _checksum(p for p in model.parameters())


def _checksum(tensors) -> str:
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def write_result(
    result: TrainingResult, model: torch.nn.Module, ctx: DistributedContext, output_dir: Path
) -> TrainingResult:
    """Every rank's checksum goes into result.json, so a diverged replica cannot hide (a collective: every rank
    calls it). Rank 0 writes result.json and model.pt. A sharded model has no replicas to compare: its one
    checksum is of the whole parameters, gathered. Returns the result as written."""
    sharded = is_sharded(model)
    # The whole model on rank 0: gathered from every rank's shards (a collective) or this rank's replica.
    state = whole_model_state(model) if sharded or ctx.is_main else {}
    if sharded:
        names = [name for name, _ in model.named_parameters()]
        whole_sha256 = broadcast_from_rank0(_checksum(state[n] for n in names) if ctx.is_main else None, ctx)
        result = replace(result, params_sha256=whole_sha256)
        checksums, identical = None, None
    else:
        result = replace(result, params_sha256=parameters_checksum(model))
        checksums = [result.params_sha256]
        if ctx.world_size > 1:
            checksums = [None] * ctx.world_size
            dist.all_gather_object(checksums, result.params_sha256)
        identical = len(set(checksums)) == 1
    if ctx.is_main:
        write_atomically(output_dir / MODEL_FILE, lambda f: torch.save(state, f))
        record = {**asdict(result), "rank_params_sha256": checksums, "replicas_identical": identical}
        write_atomically(output_dir / RESULT_FILE, lambda f: f.write((json.dumps(record, indent=2) + "\n").encode()))
    if identical is False:
        # Every rank knows; the result stays on disk for inspection, but the run must not look finished.
        raise ReplicasDivergedError(
            f"replicas diverged: parameter checksums differ across ranks ({', '.join(c[:12] for c in checksums)}); "
            f"see {output_dir / RESULT_FILE}. Something made the ranks apply different updates: a rank-"
            "dependent config, data or optimizer state, or a nondeterministic gradient reduction."
        )
    return result
