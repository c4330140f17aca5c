"""The transformer LM workload's parts: the stdlib text and its split, the model's causality, the task's
figures, and the experiment preset composing into a valid config."""

import math
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from hpcml.compute.loader import SeededSamples
from hpcml.workloads.gpt import TinyGPT
from hpcml.workloads.language_model import LanguageModeling
from hpcml.workloads.text import PythonSourceBytes, in_validation, stdlib_sources


def test_train_and_validation_share_no_file_and_every_node_gets_the_same_split():
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p.relative_to(root).as_posix() for p in stdlib_sources()]
    assert files == sorted(files) and len(files) > 100
    held_out = [f for f in files if in_validation(f, 10)]
    assert 0.05 < len(held_out) / len(files) < 0.2  # about one in ten
    train, val = PythonSourceBytes("train", 64, max_bytes=200_000), PythonSourceBytes("val", 64, max_bytes=50_000)
    assert train.sha256 != val.sha256
    assert PythonSourceBytes("train", 64, max_bytes=200_000).sha256 == train.sha256  # the same text every time


def test_a_window_is_inputs_and_the_next_bytes_and_jitter_is_seeded_per_sample():
    data = PythonSourceBytes("train", 32, max_bytes=100_000)
    x, y = data[5]
    assert x.shape == y.shape == (32,) and x.dtype == torch.int64 and torch.equal(x[1:], y[:-1])
    last_x, _ = data[len(data) - 1]  # a jittered last window still fits
    assert last_x.shape == (32,)
    # hpcml reads each sample under streams seeded from (seed, step, index): the same jitter every time.
    seeded = SeededSamples(data, seed=0)
    assert torch.equal(seeded[(3, 5)][0], seeded[(3, 5)][0])
    assert not all(torch.equal(seeded[(s, 5)][0], seeded[(3, 5)][0]) for s in range(4, 10))  # it does jitter
    fixed = PythonSourceBytes("val", 32, max_bytes=20_000, jitter=False)
    assert torch.equal(fixed[2][0], fixed.data[64:96].long())


def test_too_little_text_is_refused_naming_the_fix():
    from hpcml.errors import DataError

    with pytest.raises(DataError, match="raise max_bytes or lower block_size"):
        PythonSourceBytes("val", 128, max_bytes=200)


def test_the_model_is_causal_and_ties_its_output_to_the_embedding():
    torch.manual_seed(0)
    model = TinyGPT(block_size=16, n_layer=2, n_head=2, d_model=32).eval()
    idx = torch.randint(256, (2, 16))
    changed = idx.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 256
    a, b = model(idx), model(changed)
    assert a.shape == (2, 16, 256)
    assert torch.equal(a[:, :10], b[:, :10]) and not torch.equal(a[:, 10:], b[:, 10:])  # no peeking ahead
    assert model.head.weight is model.tokens.weight
    assert model.flops_per_token() > 6 * 32 * 32 * 12 * 2


def test_the_task_reports_perplexity_bits_and_the_unigram_bar():
    class Uniform(torch.nn.Module):
        def forward(self, x):
            return torch.zeros(*x.shape, 256)

    y = torch.tensor([[1, 1, 2, 3]])
    found = LanguageModeling().evaluate(Uniform(), [(y, y)])
    assert found["val_loss"] == pytest.approx(math.log(256))
    assert found["val_perplexity"] == pytest.approx(256) and found["val_bits_per_byte"] == pytest.approx(8)
    p = np.array([0.5, 0.25, 0.25])
    assert found["val_unigram_perplexity"] == pytest.approx(math.exp(-(p * np.log(p)).sum()))


@pytest.mark.parametrize("experiment", ["lm", "lm_gpu"])
def test_the_presets_compose_into_valid_configs(experiment):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from hpcml.config import register_configs, validate

    register_configs()
    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base=None):
        cfg = compose("train", overrides=[f"+experiment={experiment}", "train.output_dir=/tmp/x"])
    plain = OmegaConf.to_container(cfg, resolve=True)
    checked = validate(plain)
    assert checked.model["_target_"] == "hpcml.workloads.gpt.TinyGPT"
    assert checked.model["block_size"] == checked.data["block_size"] and checked.launch.objective == "val_perplexity"
