"""The launcher derives most trials' configs from the first one instead of composing each with Hydra;
a derived config must be exactly what Hydra composes, and anything else must go back to Hydra."""

import pytest
from helpers import ROOT
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from hpcml.config import register_configs, register_resolvers
from hydra_plugins.hpcml_launcher.launcher import derive_trial_config


@pytest.fixture(scope="module")
def composed():
    register_configs()
    register_resolvers()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        yield lambda overrides: compose("train", overrides=overrides, return_hydra_config=True)


def parse(overrides):
    return OverridesParser.create().parse_overrides(overrides)


@pytest.mark.parametrize(
    "first, other",
    [
        (["optim.lr=0.1", "train.seed=1"], ["optim.lr=0.001", "train.seed=7"]),
        (["cluster.partition=gpu", "model.width=128"], ["cluster.partition=null", "model.width=512"]),
        (["checkpoint.async_save=true", "data.name=synthetic"], ["checkpoint.async_save=false", "data.name=digits"]),
        (["optim.lr=1e-3", "launch.objective=final_loss"], ["optim.lr=3e-4", "launch.objective='test_accuracy'"]),
        # Config groups every trial shares are in the template already; the swept value is still derived.
        (["cluster=local", "optim=adam", "optim.lr=0.1"], ["cluster=local", "optim=adam", "optim.lr=0.2"]),
    ],
)
def test_a_derived_trial_config_is_the_one_hydra_composes(composed, first, other):
    derived = derive_trial_config(composed(first), parse(first), parse(other))
    assert derived is not None
    expected = OmegaConf.to_container(composed(other), resolve=False)
    assert OmegaConf.to_container(derived, resolve=False) == expected
    assert derived.hydra.job.override_dirname == composed(other).hydra.job.override_dirname


@pytest.mark.parametrize(
    "first, other",
    [
        (["optim=adam"], ["optim=sgd"]),  # a config group: only Hydra knows what it brings
        (["cluster=local", "optim.lr=0.1"], ["cluster=none", "optim.lr=0.1"]),
        (["cluster.srun_args=[a]"], ["cluster.srun_args=[b]"]),  # a container
        (["optim.lr=0.1"], ["train.seed=3"]),  # other keys
        (["train.steps=5"], ["train.steps=many"]),  # a bad value: Hydra's error message, not ours
        (["optim.lr=0.1"], ["+optim.extra=1"]),
        (["train.seed=1"], ["train.seed=1", "optim.lr=0.2"]),
    ],
)
def test_anything_but_new_values_for_the_same_plain_keys_goes_back_to_hydra(composed, first, other):
    assert derive_trial_config(composed(first), parse(first), parse(other)) is None


def test_the_login_node_side_never_imports_torch():
    """Submitting, sweeping and `hpcml status` need no torch; importing it costs every command a second."""
    import subprocess
    import sys

    code = "import sys, hpcml.sweep, hpcml.cli, hpcml.launch, hpcml.config; hpcml.config.TrainJobConfig(); "
    code += "sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_plain_dict_of_a_config_is_what_omegaconf_would_give():
    """to_plain_dict uses dataclasses.asdict for speed; it must match OmegaConf's resolved container."""
    from hpcml.config import TrainJobConfig, to_plain_dict, validate

    cfg = validate(
        OmegaConf.create({"cluster": {"name": "x", "partition": "gpu", "env": {"A": "1"}, "srun_args": ["--mpi=pmix"]}})
    )
    expected = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    assert to_plain_dict(cfg) == expected
    assert to_plain_dict(TrainJobConfig()) == OmegaConf.to_container(OmegaConf.structured(TrainJobConfig()))
