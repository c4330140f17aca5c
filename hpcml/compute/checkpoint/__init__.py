"""Verified, resumable checkpoints: `step-<N>/` folders committed by a checksum manifest written last.

layout.py: what every checkpoint folder is and how it is committed, verified and pruned;
replicated.py: the DDP layout (rank 0 writes the whole state, inline or on a background thread);
sharded.py: the FSDP layout (every rank writes its shard through DCP; loads at any world size);
rng.py: each rank's random streams.
"""

from hpcml.compute.checkpoint.layout import (
    MANIFEST,
    REPLICATED,
    SHARDED,
    STATE_FILE,
    CheckpointCorruptError,
    layout_of,
    list_checkpoints,
    prune_checkpoints,
    read_manifest,
    rng_file,
    step_dir_name,
    verify_checkpoint,
)
from hpcml.compute.checkpoint.replicated import (
    CheckpointWriter,
    LoadedCheckpoint,
    Snapshot,
    StagingArea,
    holds_gpu_tensors,
    load_checkpoint,
    load_latest_verified,
    snapshot,
    verify_and_load,
    write_checkpoint,
)
from hpcml.compute.checkpoint.rng import capture_rng_state, restore_rng_state

__all__ = [
    "MANIFEST",
    "REPLICATED",
    "SHARDED",
    "STATE_FILE",
    "CheckpointCorruptError",
    "CheckpointWriter",
    "LoadedCheckpoint",
    "Snapshot",
    "StagingArea",
    "capture_rng_state",
    "holds_gpu_tensors",
    "layout_of",
    "list_checkpoints",
    "load_checkpoint",
    "load_latest_verified",
    "prune_checkpoints",
    "read_manifest",
    "restore_rng_state",
    "rng_file",
    "snapshot",
    "step_dir_name",
    "verify_and_load",
    "verify_checkpoint",
    "write_checkpoint",
]
