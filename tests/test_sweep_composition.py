"""The launcher derives most trials' configs from the first one instead of composing each with Hydra;
a derived config must be exactly what Hydra composes, and anything else must go back to Hydra."""

import re

import pytest
from helpers import ROOT
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from hpcml.compute.run_dir import register_resolvers
from hpcml.config import register_configs, validate, with_values
from hpcml.errors import ConfigError
from hydra_plugins.hpcml_launcher.launcher import HpcmlLauncher, derive_trial_config


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
        (["checkpoint.async_save=true", "data=synthetic"], ["checkpoint.async_save=false", "data=synthetic"]),
        (["data=synthetic", "data.input_dim=8"], ["data=synthetic", "data.input_dim=16"]),
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


class ComposeLikeHydra:
    """The launcher's view of Hydra: its config loader composes a trial from its overrides and the
    command line's hydra.* overrides, which are not the trial's own."""

    def __init__(self, composed, hydra_overrides):
        self.config_loader = self
        self.composed = composed
        self.hydra_overrides = hydra_overrides
        self.compositions = 0

    def load_sweep_config(self, master_config, overrides):
        self.compositions += 1
        return self.composed([*overrides, *self.hydra_overrides])


def launcher_for(composed, sweep_dir, hydra_overrides=()):
    hydra_overrides = [*hydra_overrides, f"hydra.sweep.dir={sweep_dir}"]
    launcher = HpcmlLauncher()
    hydra = ComposeLikeHydra(composed, hydra_overrides)
    launcher.setup(hydra_context=hydra, task_function=None, config=composed(hydra_overrides))
    return launcher, hydra


# name: (hydra.* overrides, overrides every trial has, swept keys, whether the values alone decide a trial)
SWEEPS = {
    "plain values": ([], ["cluster=local", "optim=adam"], ["optim.lr", "train.seed"], True),
    "values of several kinds": ([], [], ["cluster.partition", "launch.objective", "checkpoint.async_save"], True),
    "subdir from hydra.job": (["hydra.sweep.subdir=${hydra.job.override_dirname}"], [], ["optim.lr"], True),
    "subdir from a task key": (["hydra.sweep.subdir=lr_${optim.lr}"], [], ["optim.lr"], False),
    "a task value reads a swept one": ([], ["model.depth=${train.seed}"], ["train.seed"], False),
    "a swept key the model's input_dim reads": ([], ["data=synthetic"], ["data.input_dim"], False),
    "a task value calls a resolver": ([], ["train.log_every=${oc.decode:'7'}"], ["train.seed"], False),
}
VALUES = {
    "optim.lr": ["0.1", "0.001", "3e-4"],
    "train.seed": ["1", "7", "2"],
    "cluster.partition": ["gpu", "null", "'debug'"],
    "launch.objective": ["final_loss", "'test_accuracy'", "final_loss"],
    "checkpoint.async_save": ["true", "false", "true"],
    "data.input_dim": ["8", "16", "32"],
}


@pytest.mark.parametrize("name", SWEEPS)
def test_every_trial_of_a_sweep_is_what_hydra_composes_and_validates(composed, tmp_path, name):
    """Trials derived from the first (from its validated config where the new values alone decide, from its
    composed config elsewhere) get the same config and directory as composing each with Hydra."""
    hydra_overrides, shared, swept, values_alone = SWEEPS[name]
    trials = [[*shared, *(f"{key}={VALUES[key][i]}" for key in swept)] for i in range(3)]
    sweep_dir = tmp_path / "sweep"
    launcher, hydra = launcher_for(composed, sweep_dir, hydra_overrides)
    derived = [launcher.validated_trial(overrides, num) for num, overrides in enumerate(trials)]
    for num, overrides in enumerate(trials):
        alone, _ = launcher_for(composed, sweep_dir, hydra_overrides)  # a fresh launcher composes its first trial
        assert derived[num] == alone.validated_trial(overrides, num)
    assert hydra.compositions == 1  # the first trial; the rest were derived
    assert launcher.derived_from_validated == (2 if values_alone else 0)
    assert derived[0][0] != derived[1][0] and derived[0][1].parent == sweep_dir


@pytest.mark.parametrize("bad", ["train.steps=0", "train.steps=many"])
def test_a_bad_value_in_a_derived_trial_gets_the_error_composing_it_gets(composed, tmp_path, bad):
    launcher, _ = launcher_for(composed, tmp_path)
    launcher.validated_trial(["train.steps=5"], 0)
    launcher.validated_trial(["train.steps=6"], 1)
    assert launcher.derived_from_validated == 1
    with pytest.raises(Exception) as derived:
        launcher.validated_trial([bad], 1)
    alone, _ = launcher_for(composed, tmp_path)
    with pytest.raises(Exception) as composed_whole:
        alone.validated_trial([bad], 1)
    assert type(derived.value) is type(composed_whole.value)
    assert str(derived.value) == str(composed_whole.value)
    if bad == "train.steps=0":
        assert isinstance(derived.value, ConfigError) and str(derived.value) == "train.steps=0 must be 1 or more."


def test_with_values_checks_what_validate_checks():
    base = validate(OmegaConf.create({}))
    # A component's values keep their type (the launcher hands over Hydra's parsed values); typed sections convert.
    changed = with_values(base, {"optim.lr": 0.5, "train.seed": "3", "cluster.env.A": "1"})
    expected = validate(OmegaConf.create({"optim": {"lr": 0.5}, "train": {"seed": 3}, "cluster": {"env": {"A": "1"}}}))
    assert changed == expected and base.optim["lr"] != 0.5  # the template is not touched
    for values, message in [
        ({"train.steps": "many"}, "train.steps='many': Value 'many' of type 'str' could not be converted to Integer"),
        ({"train.nokey": 1}, "train.nokey=1: Key 'nokey' not in 'TrainConfig'"),
        ({"optim.lrr": 1}, "optim._target_=torch.optim.SGD: it takes no argument 'lrr' (did you mean 'lr'?)"),
        ({"train.log_every": 0}, "train.log_every=0 must be 1 or more."),
        ({"seed": 1}, "seed: not a key of a config section"),
        # The whole config's own checks run too, not just the section's.
        ({"cluster.submit": True, "cluster.nodes": 3}, "train.global_batch_size=64 does not split evenly"),
    ]:
        with pytest.raises(ConfigError, match="^" + re.escape(message)):
            with_values(base, values)


def test_the_login_node_side_never_imports_torch():
    """Submitting, sweeping and `hpcml status` need no torch; importing it costs every command a second."""
    import subprocess
    import sys

    code = "import sys, hpcml.login.sweep, hpcml.login.cli, hpcml.login.launch, hpcml.config; hpcml.config.TrainJobConfig(); "
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
