import numpy as np
import pytest
import torch

from hpcml.compute.data import GlobalBatchStream, load_dataset, on_device
from hpcml.config import DataConfig
from hpcml.errors import ConfigError, DataError


def test_rank_slices_concatenate_to_the_global_batch_at_any_world_size():
    stream = GlobalBatchStream(num_samples=100, global_batch_size=12, seed=3)
    for step in (0, 5, 8, 9, 40):  # crosses epoch boundaries (8 steps per epoch)
        whole = stream.global_batch(step)
        for world in (1, 2, 3, 4, 6):
            parts = np.concatenate([stream.rank_batch(step, r, world) for r in range(world)])
            np.testing.assert_array_equal(parts, whole)


def test_stream_is_deterministic_and_epochs_are_permutations():
    a = GlobalBatchStream(96, 8, seed=1)
    b = GlobalBatchStream(96, 8, seed=1)
    epoch0 = np.concatenate([a.global_batch(s) for s in range(12)])
    assert sorted(epoch0) == list(range(96))
    np.testing.assert_array_equal(epoch0, np.concatenate([b.global_batch(s) for s in range(12)]))
    epoch1 = np.concatenate([a.global_batch(s) for s in range(12, 24)])
    assert not np.array_equal(epoch0, epoch1)
    assert not np.array_equal(a.global_batch(0), GlobalBatchStream(96, 8, seed=2).global_batch(0))


def test_samples_consumed_is_independent_of_world_size():
    assert GlobalBatchStream(100, 10, 0).samples_consumed(7) == 70


def test_uneven_split_and_oversized_batch_are_refused():
    with pytest.raises(ConfigError, match="multiple of 3"):
        GlobalBatchStream(100, 10, 0).rank_batch(0, 0, 3)
    with pytest.raises(ConfigError, match="exceeds the 10 training samples"):
        GlobalBatchStream(10, 11, 0)


def test_digits_ship_with_the_package():
    data = load_dataset(DataConfig(name="digits"))
    assert data.input_dim == 64 and data.num_classes == 10
    assert len(data.x_train) + len(data.x_test) == 1797
    assert float(data.x_train.max()) <= 1.0


def test_synthetic_is_seeded():
    a = load_dataset(DataConfig(name="synthetic", num_samples=200, input_dim=8, num_classes=3))
    b = load_dataset(DataConfig(name="synthetic", num_samples=200, input_dim=8, num_classes=3))
    assert (a.x_train == b.x_train).all() and a.input_dim == 8 and a.num_classes <= 3


def test_npz_round_trip_and_bad_files(tmp_path):
    good = tmp_path / "good.npz"
    np.savez(good, x=np.ones((10, 3)), y=np.arange(10) % 2)
    data = load_dataset(DataConfig(name="npz", path=str(good)))
    assert data.input_dim == 3
    missing_y = tmp_path / "bad.npz"
    np.savez(missing_y, x=np.ones((10, 3)))
    with pytest.raises(DataError, match="lacks array 'y'"):
        load_dataset(DataConfig(name="npz", path=str(missing_y)))
    not_npz = tmp_path / "text.npz"
    not_npz.write_text("hello")
    with pytest.raises(DataError, match="cannot read"):
        load_dataset(DataConfig(name="npz", path=str(not_npz)))


def test_digits_read_from_the_csv_equal_scikit_learns_loader():
    """hpcml reads the CSV that load_digits reads, without importing sklearn (0.9 s of start-up)."""
    from sklearn.datasets import load_digits

    from hpcml.compute.data import _digits

    x, y = _digits()
    bunch = load_digits()
    np.testing.assert_array_equal(x, bunch.data.astype(np.float32) / 16.0)
    np.testing.assert_array_equal(y, bunch.target)
    assert x.dtype == np.float32 and y.dtype == np.int64


def test_data_stays_where_it_is_for_cpu_training():
    data = load_dataset(DataConfig(name="synthetic", num_samples=64, input_dim=8))
    assert on_device(data, torch.device("cpu")) is data
    assert data.nbytes == sum(t.numel() * t.element_size() for t in data.tensors()) > 0
