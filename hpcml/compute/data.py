"""The global batch stream every rank takes its share of, and batches gathered from a Dataset.

The stream is defined by global step alone: step s uses global batch s of a seeded per-epoch permutation,
and rank r trains on the r-th contiguous slice of it. It does not depend on the world size, so N ranks
see exactly the samples one process would, and a resume (at any world size) only needs the step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, TensorDataset, default_collate

from hpcml.errors import ConfigError, DataError

log = logging.getLogger(__name__)

# The whole dataset moves to the GPU when it takes at most this share of the device's free memory: each
# step then gathers its batch on the device, instead of on the host followed by a copy from pageable
# memory, which the GPU waits for.
DEVICE_DATA_SHARE = 0.25


class GlobalBatchStream:
    """Indices of global batch `step`, and the slice of it that one rank trains on."""

    def __init__(self, num_samples: int, global_batch_size: int, seed: int):
        if global_batch_size > num_samples:
            raise ConfigError(
                f"train.global_batch_size={global_batch_size} exceeds the {num_samples} training samples; lower it."
            )
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.steps_per_epoch = num_samples // global_batch_size  # the ragged tail is dropped: equal batches
        self._epoch = -1
        self._order: np.ndarray | None = None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
            self._epoch = epoch
        return self._order

    def global_batch(self, step: int) -> np.ndarray:
        epoch, within = divmod(step, self.steps_per_epoch)
        start = within * self.global_batch_size
        return self._permutation(epoch)[start : start + self.global_batch_size]

    def rank_batch(self, step: int, rank: int, world_size: int) -> np.ndarray:
        if self.global_batch_size % world_size:
            raise ConfigError(
                f"train.global_batch_size={self.global_batch_size} does not split evenly over {world_size} ranks; "
                f"make it a multiple of {world_size}."
            )
        share = self.global_batch_size // world_size
        return self.global_batch(step)[rank * share : (rank + 1) * share]

    def micro_batches(self, step: int, rank: int, world_size: int, count: int) -> list[np.ndarray]:
        """This rank's slice of global batch `step`, in `count` equal consecutive micro-batches (gradient
        accumulation): the same samples as `rank_batch`, whatever the count."""
        share = self.rank_batch(step, rank, world_size)
        if count == 1:
            return [share]
        if len(share) % count:
            raise ConfigError(
                f"train.global_batch_size={self.global_batch_size} over {world_size} ranks gives each rank "
                f"{len(share)} samples, which do not split into train.grad_accum_steps={count} equal micro-batches; "
                f"make the global batch a multiple of {world_size * count}."
            )
        return np.split(share, count)

    def state_dict(self) -> dict[str, int]:
        """What the stream is: a resume must continue the same one, not another of the same length."""
        return {"num_samples": self.num_samples, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int] | None) -> None:
        if state is None:  # written before the stream was recorded
            return
        if state != self.state_dict():
            raise ConfigError(
                f"the checkpoint's sample stream had {state['num_samples']} training samples and train.seed="
                f"{state['seed']}; this run has {self.num_samples} and {self.seed}, so it would continue another "
                "stream. Resume with the same data and seed, or start fresh with checkpoint.resume=none."
            )

    def samples_consumed(self, step: int) -> int:
        """The data position as a count of global samples, independent of the world size."""
        return step * self.global_batch_size


def check_map_style(dataset: Any, key: str) -> int:
    """The number of samples of a map-style dataset; anything else is refused, naming the key."""
    if isinstance(dataset, IterableDataset):
        raise DataError(
            f"{key} is an IterableDataset: its position cannot be restored from a step count, so a resumed run could "
            "not continue the same sample stream. Give a map-style Dataset (__getitem__ and __len__)."
        )
    if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
        raise DataError(f"{key} built a {type(dataset).__name__}, not a Dataset with __getitem__ and __len__.")
    size = len(dataset)
    if size < 1:
        raise DataError(f"{key} is empty; it must hold at least one sample.")
    return size


def to_device(batch: Any, device: torch.device) -> Any:
    """Every tensor in a (nested tuple, list or dict) batch on `device`."""
    if isinstance(batch, torch.Tensor):
        # A tensor already there is not handed to torch at all: Tensor.to releases the GIL even when it has
        # nothing to do, and taking it back could wait for the thread receiving the next batch (loader.py),
        # descheduled while holding it on busy cores. Measured in the seam benchmark on 2 cores: 0.8 ms of a
        # 20 ms CPU step, most of the loader's wait (loader wait ratio 0.955-0.977 -> 0.996).
        return batch if batch.device == device else batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def gather(dataset: Any, indices: np.ndarray, collate: Callable[[list[Any]], Any] | None = None) -> Any:
    """The samples at `indices`, collated into one batch. In-memory tensors (a TensorDataset) are indexed
    all at once, the fast path; any other Dataset (or any with a collate function of its own) collates its
    samples, with torch's default_collate unless `collate` is given."""
    if isinstance(dataset, TensorDataset) and collate is None:
        idx = torch.from_numpy(indices).to(dataset.tensors[0].device, non_blocking=True)  # no-op for host data
        return tuple(t[idx] for t in dataset.tensors)
    return (collate or default_collate)([dataset[int(i)] for i in indices])


def eval_batches(
    dataset: Any, batch_size: int, device: torch.device, collate: Callable[[list[Any]], Any] | None = None
) -> Iterator[Any]:
    """The whole eval dataset, in order, in batches of `batch_size`, on `device` (collated as training's are)."""
    size = len(dataset)
    for start in range(0, size, batch_size):
        yield to_device(gather(dataset, np.arange(start, min(start + batch_size, size)), collate), device)


def on_device(dataset: Any, device: torch.device) -> Any:
    """An in-memory dataset on the GPU `device` when it fits comfortably (DEVICE_DATA_SHARE), else unchanged."""
    if device.type != "cuda" or not isinstance(dataset, TensorDataset):
        return dataset
    nbytes = sum(t.numel() * t.element_size() for t in dataset.tensors)
    free, _ = torch.cuda.mem_get_info(device)
    if nbytes > DEVICE_DATA_SHARE * free:
        log.info(
            "the dataset (%.0f MB) stays in host memory: it would take more than %.0f%% of the GPU's free memory",
            nbytes / 2**20,
            100 * DEVICE_DATA_SHARE,
        )
        return dataset
    return TensorDataset(*(t.to(device) for t in dataset.tensors))
