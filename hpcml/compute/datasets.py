"""The datasets hpcml ships (`data=digits`, `data=synthetic`, `data=npz`): in-memory TensorDatasets of
(features, label), split into train and test by a seeded permutation.

Each is a function `name(split=..., ...)`: the config's `data.train` and `data.eval` call the same one with
`split: train` and `split: test`, and the seed makes every rank (and every resumed run) hold out the same
samples. Any map-style `torch.utils.data.Dataset` works in their place (hpcml/components.py).
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from hpcml.errors import DataError

SPLITS = ("train", "test")


def _split(x: np.ndarray, y: np.ndarray, split: str, test_fraction: float, seed: int) -> TensorDataset:
    if split not in SPLITS:
        raise DataError(f"split={split!r} is not one of {', '.join(SPLITS)}.")
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction={test_fraction} must lie strictly between 0 and 1.")
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = max(1, int(round(len(x) * test_fraction)))
    chosen = order[:n_test] if split == "test" else order[n_test:]
    return TensorDataset(torch.from_numpy(x[chosen]), torch.from_numpy(y[chosen]))


def digits(split: str = "train", test_fraction: float = 0.2, seed: int = 0) -> TensorDataset:
    """scikit-learn's bundled 8x8 digits (no download on a compute node): 64 features in [0, 1], 10 classes.

    Importing sklearn.datasets to call load_digits is a large share of a rank's start-up; the file is what
    load_digits reads: 64 pixel columns (0-16) and the label, comma-separated, gzipped.
    """
    spec = importlib.util.find_spec("sklearn")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise DataError("data=digits needs scikit-learn installed (it ships the images); pip install scikit-learn.")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    return _split(table[:, :-1] / 16.0, table[:, -1].astype(np.int64), split, test_fraction, seed)


def synthetic(
    split: str = "train",
    num_samples: int = 4096,
    input_dim: int = 64,
    num_classes: int = 10,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> TensorDataset:
    """A seeded teacher problem: labels from a random linear map, so it is learnable at any size."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((num_samples, input_dim), dtype=np.float32)
    teacher = rng.standard_normal((input_dim, num_classes), dtype=np.float32)
    return _split(x, (x @ teacher).argmax(axis=1).astype(np.int64), split, test_fraction, seed)


def npz(path: str, split: str = "train", test_fraction: float = 0.2, seed: int = 0) -> TensorDataset:
    """Arrays x (N, D) and y (N,) from an .npz file every node can read."""
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
    return _split(x.astype(np.float32), y.astype(np.int64), split, test_fraction, seed)
