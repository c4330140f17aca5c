import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, IterableDataset, TensorDataset, default_collate

from hpcml.compute import datasets
from hpcml.compute.data import GlobalBatchStream, check_map_style, eval_batches, gather, on_device, to_device
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
    train, test = datasets.digits("train"), datasets.digits("test")
    x, y = train.tensors
    assert x.shape[1] == 64 and int(max(y.max(), test.tensors[1].max())) + 1 == 10
    assert len(train) + len(test) == 1797 and len(test) == round(1797 * 0.2)
    assert float(x.max()) <= 1.0


def test_the_split_is_seeded_and_disjoint():
    a, b = (
        datasets.synthetic("train", num_samples=200, input_dim=8, num_classes=3),
        datasets.synthetic("train", num_samples=200, input_dim=8, num_classes=3),
    )
    assert torch.equal(a.tensors[0], b.tensors[0]) and a.tensors[0].shape == (160, 8)
    test = datasets.synthetic("test", num_samples=200, input_dim=8, num_classes=3)
    rows = {tuple(r.tolist()) for r in a.tensors[0]}
    assert not rows & {tuple(r.tolist()) for r in test.tensors[0]}
    with pytest.raises(DataError, match="split='val' is not one of train, test"):
        datasets.synthetic("val")


def test_npz_round_trip_and_bad_files(tmp_path):
    good = tmp_path / "good.npz"
    np.savez(good, x=np.ones((10, 3)), y=np.arange(10) % 2)
    assert datasets.npz(str(good)).tensors[0].shape == (8, 3)
    missing_y = tmp_path / "bad.npz"
    np.savez(missing_y, x=np.ones((10, 3)))
    with pytest.raises(DataError, match="lacks array 'y'"):
        datasets.npz(str(missing_y))
    not_npz = tmp_path / "text.npz"
    not_npz.write_text("hello")
    with pytest.raises(DataError, match="cannot read"):
        datasets.npz(str(not_npz))


def test_digits_read_from_the_csv_equal_scikit_learns_loader():
    """hpcml reads the CSV that load_digits reads, without importing sklearn (0.9 s of start-up)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    train, test = datasets.digits("train"), datasets.digits("test")
    x = torch.cat([train.tensors[0], test.tensors[0]])
    y = torch.cat([train.tensors[1], test.tensors[1]])
    order = np.random.default_rng(0).permutation(1797)
    held_out, kept = order[: len(test)], order[len(test) :]
    np.testing.assert_array_equal(x.numpy(), (bunch.data.astype(np.float32) / 16.0)[np.concatenate([kept, held_out])])
    np.testing.assert_array_equal(y.numpy(), bunch.target[np.concatenate([kept, held_out])])
    assert x.dtype == torch.float32 and y.dtype == torch.int64


class Squares(Dataset):
    """A map-style Dataset that is not a TensorDataset: samples are dicts, as many user datasets' are."""

    def __len__(self):
        return 10

    def __getitem__(self, i):
        return {"x": torch.tensor([float(i), float(i * i)]), "label": i % 3}


def test_any_map_style_dataset_gives_the_batch_its_collated_samples():
    batch = gather(Squares(), np.array([3, 1]))
    assert torch.equal(batch["x"], torch.tensor([[3.0, 9.0], [1.0, 1.0]])) and batch["label"].tolist() == [0, 1]
    tensors = TensorDataset(torch.arange(10.0), torch.arange(10) % 2)
    fast = gather(tensors, np.array([4, 7]))
    assert [t.tolist() for t in fast] == [[4.0, 7.0], [0, 1]]
    assert [t.tolist() for t in default_collate([tensors[4], tensors[7]])] == [t.tolist() for t in fast]


def test_eval_batches_cover_the_dataset_in_order():
    sizes = [len(b["label"]) for b in eval_batches(Squares(), 4, torch.device("cpu"))]
    assert sizes == [4, 4, 2]
    firsts = [b["x"][0, 0].item() for b in eval_batches(Squares(), 4, torch.device("cpu"))]
    assert firsts == [0.0, 4.0, 8.0]


def test_datasets_that_cannot_resume_exactly_are_refused():
    class Stream(IterableDataset):
        def __iter__(self):
            yield from range(3)

    with pytest.raises(DataError, match="data.train is an IterableDataset: its position cannot be restored"):
        check_map_style(Stream(), "data.train")
    with pytest.raises(DataError, match="data.eval built a list_iterator"):
        check_map_style(iter([1]), "data.eval")
    with pytest.raises(DataError, match="data.train is empty"):
        check_map_style(TensorDataset(torch.zeros(0)), "data.train")
    assert check_map_style(Squares(), "data.train") == 10


def test_data_stays_where_it_is_for_cpu_training():
    data = datasets.synthetic("train", num_samples=64, input_dim=8)
    assert on_device(data, torch.device("cpu")) is data


def test_a_batch_already_on_its_device_is_not_handed_to_torch(monkeypatch):
    """Tensor.to releases the GIL even as a no-op; the loader's receiving thread may then hold it (data.py)."""
    batch = {"x": torch.ones(3), "pair": (torch.zeros(2), torch.arange(4))}
    calls = []
    real_to = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: calls.append(a) or real_to(self, *a, **k))
    moved = to_device(batch, torch.device("cpu"))
    assert calls == []
    assert moved["x"] is batch["x"] and moved["pair"][0] is batch["pair"][0] and moved["pair"][1] is batch["pair"][1]
    to_device(batch, torch.device("meta"))  # another device: every tensor goes through Tensor.to
    assert len(calls) == 3
    to_device(batch, torch.device("cpu", 0))  # the same type, another index (a rank's cuda:0 against cuda:1)
    assert len(calls) == 6
