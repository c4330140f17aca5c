"""Datasets and the global batch stream every rank takes its share of.

The stream is defined by global step alone: step s uses global batch s of a seeded per-epoch permutation,
and rank r trains on the r-th contiguous slice of it. It does not depend on the world size, so N ranks
see exactly the samples one process would, and a resume (at any world size) only needs the step.
"""

from __future__ import annotations

import gzip
import importlib.util
import logging
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from hpcml.config import DataConfig
from hpcml.errors import ConfigError, DataError

log = logging.getLogger(__name__)

# The whole dataset moves to the GPU when it takes at most this share of the device's free memory: each
# step then gathers its batch on the device, instead of on the host followed by a copy from pageable
# memory, which the GPU waits for.
DEVICE_DATA_SHARE = 0.25


@dataclass(frozen=True)
class Dataset:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def tensors(self) -> list[torch.Tensor]:
        return [getattr(self, f.name) for f in fields(self)]

    @property
    def input_dim(self) -> int:
        return self.x_train.shape[1]

    @property
    def num_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max())) + 1


def _digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits (no download on a compute node), read straight from its CSV.

    Importing sklearn.datasets to call load_digits is a large share of a rank's start-up; the file is what
    load_digits reads: 64 pixel columns (0-16) and the label, comma-separated, gzipped.
    """
    spec = importlib.util.find_spec("sklearn")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "data.name=digits needs scikit-learn installed (it ships the images); pip install scikit-learn."
        )
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    return table[:, :-1] / 16.0, table[:, -1].astype(np.int64)


def _synthetic(cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """A seeded teacher problem: labels from a random linear map, so it is learnable at any size."""
    rng = np.random.default_rng(cfg.seed)
    x = rng.standard_normal((cfg.num_samples, cfg.input_dim), dtype=np.float32)
    teacher = rng.standard_normal((cfg.input_dim, cfg.num_classes), dtype=np.float32)
    return x, (x @ teacher).argmax(axis=1).astype(np.int64)


def _npz(path: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as arrays:
            missing = [name for name in ("x", "y") if name not in arrays.files]
            if missing:
                raise DataError(
                    f"{path} lacks array {missing[0]!r}; save it with np.savez(path, x=features, y=labels)."
                )
            x, y = arrays["x"], arrays["y"]
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read {path}: {err}; it must be an .npz file with arrays x and y.") from err
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y):
        raise DataError(f"{path}: x must be (N, D) and y (N,); got x{x.shape}, y{y.shape}.")
    return x.astype(np.float32), y.astype(np.int64)


def load_dataset(cfg: DataConfig) -> Dataset:
    if cfg.name == "digits":
        x, y = _digits()
    elif cfg.name == "synthetic":
        x, y = _synthetic(cfg)
    else:
        x, y = _npz(cfg.path)
    # The split is seeded, so every rank (and every resumed run) holds out the same samples.
    order = np.random.default_rng(cfg.seed).permutation(len(x))
    n_test = max(1, int(round(len(x) * cfg.test_fraction)))
    test, train = order[:n_test], order[n_test:]
    return Dataset(
        torch.from_numpy(x[train]), torch.from_numpy(y[train]), torch.from_numpy(x[test]), torch.from_numpy(y[test])
    )


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

    def samples_consumed(self, step: int) -> int:
        """The data position as a count of global samples, independent of the world size."""
        return step * self.global_batch_size


def on_device(data: Dataset, device: torch.device) -> Dataset:
    """`data` on the GPU `device` when it fits comfortably (DEVICE_DATA_SHARE), else unchanged."""
    if device.type != "cuda":
        return data
    free, _ = torch.cuda.mem_get_info(device)
    if data.nbytes > DEVICE_DATA_SHARE * free:
        log.info(
            "the dataset (%.0f MB) stays in host memory: it would take more than %.0f%% of the GPU's free memory",
            data.nbytes / 2**20,
            100 * DEVICE_DATA_SHARE,
        )
        return data
    return Dataset(*(t.to(device) for t in data.tensors()))
