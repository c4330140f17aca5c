import pytest
from helpers import ROOT
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from hpcml.compute.run_dir import register_resolvers
from hpcml.config import ClusterConfig, TrainJobConfig, register_configs, validate
from hpcml.errors import ConfigError

register_configs()
register_resolvers()


def compose_train(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def test_defaults_compose_and_validate():
    cfg = validate(compose_train(["train.output_dir=/x"]))
    assert isinstance(cfg, TrainJobConfig)
    assert cfg.cluster.name == "none" and not cfg.cluster.submit
    assert cfg.data["train"]["_target_"] == "hpcml.compute.datasets.digits"
    assert cfg.optim["_target_"] == "torch.optim.SGD" and cfg.schedule is None
    assert cfg.model["input_dim"] == 64  # interpolated from data=digits


def test_the_built_in_components_are_the_config_groups_defaults():
    """A config built in Python (TrainJobConfig()) trains what `python jobs/train.py` trains."""
    composed = validate(compose_train(["train.output_dir=/x"]))
    built = TrainJobConfig()
    for key in ("model", "data", "optim", "schedule", "task"):
        assert getattr(composed, key) == getattr(built, key), key


def test_local_cluster_group():
    cfg = validate(compose_train(["cluster=local", "train.output_dir=/x"]))
    assert (cfg.cluster.nodes, cfg.cluster.tasks_per_node, cfg.cluster.partition) == (2, 2, "batch")
    assert "--mpi=pmix" in cfg.cluster.srun_args


def test_example_site_is_a_valid_gpu_config():
    cfg = validate(compose_train(["cluster=example_site", "train.output_dir=/x"]))
    assert cfg.cluster.gpus_per_node == cfg.cluster.tasks_per_node == 4


@pytest.mark.parametrize("override", ["train.stepz=10", "optim.lrr=0.1"])
def test_unknown_key_fails_in_hydra(override):
    """A typo in a key is refused by Hydra (a component's new keyword needs `+key=value`: checked below)."""
    with pytest.raises(ConfigCompositionException, match=override.partition("=")[0]):
        compose_train([override])


def test_wrong_type_fails_in_hydra():
    with pytest.raises(ConfigCompositionException, match="cluster.nodes"):
        compose_train(["cluster.nodes=two"])


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["cluster=local", "cluster.nodes=0"], "cluster.nodes=0"),
        (["cluster.tasks_per_node=0"], "cluster.tasks_per_node=0"),
        (["train.backend=mpi"], "train.backend='mpi' is not one of auto, gloo, nccl"),
        (["train.grad_sync=horovod"], "train.grad_sync='horovod'"),
        (["train.transport=ucx"], "train.transport='ucx' is not one of auto, torch, mpi"),
        (["train.grad_sync=mpi"], "train.grad_sync=mpi is now spelled train.grad_sync=flat train.transport=mpi"),
        (["+optim.lrr=0.1"], r"optim._target_=torch.optim.SGD: it takes no argument 'lrr' \(did you mean 'lr'\?\)"),
        (["optim=adam", "+optim.momentum=0.9"], "optim._target_=torch.optim.Adam: it takes no argument 'momentum'"),
        (["+optim.params=[]"], "'params' is passed by hpcml itself"),
        (["schedule=cosine", "~schedule.T_max"], "it needs 'T_max'"),
        (["model._target_=no_such_package.Net"], "model._target_=no_such_package.Net: no such module"),
        (["model._target_=hpcml.compute.models.Nope"], "has no attribute 'Nope'"),
        (
            ["+task.loss._target_=torch.nn.CrossEntropyLoss", "+task.loss.smoothing=0.1"],
            "task.loss._target_=torch.nn.CrossEntropyLoss: it takes no argument 'smoothing'",
        ),
        (["+optim.name=adam"], "optim.name is gone: the optimizer is a config group"),
        (["data=npz"], "Missing mandatory value: data."),
        (
            ["data=npz", "data.path=/nonexistent/data.npz", "data.input_dim=3", "data.num_classes=2"],
            "data.train.path=/nonexistent/data.npz does not exist",
        ),
        (["cluster=local", "train.global_batch_size=30"], "does not split evenly over 4 ranks"),
        (["cluster=local", "cluster.network_interface='eth0; rm'"], "is not an interface list NCCL reads"),
        (["cluster=local", "cluster.nccl_debug=LOUD"], "cluster.nccl_debug='LOUD' is not one of"),
        (["cluster=local", "cluster.min_nodes=3"], "cluster.min_nodes=3 must be between 1 and cluster.nodes=2"),
        (
            ["cluster=local", "cluster.nodes=3", "cluster.min_nodes=2", "train.global_batch_size=44"],
            "over 6 ranks .3 nodes x 2., which the job runs on when Slurm gives it 3 of its 2-3 nodes\\b",
        ),
        (["train.grad_sync=fsdp", "train.precision=fp16"], "train.precision=fp16 needs a loss scaler"),
        (["train.grad_sync=fsdp", "train.transport=mpi"], "train.grad_sync=fsdp reduce-scatters"),
        (["cluster=example_site", "cluster.gpus_per_node=2"], "one rank per GPU"),
    ],
)
def test_invalid_values_raise_config_error_naming_the_key(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment if "\\" in fragment else fragment.replace("(", r"\(")):
        validate(compose_train([*overrides, "train.output_dir=/x"]))


def test_validate_accepts_a_plain_dict_round_trip():
    from hpcml.config import to_plain_dict

    cfg = validate(compose_train(["cluster=local", "train.output_dir=/x"]))
    assert validate(to_plain_dict(cfg)) == cfg


def test_world_size():
    assert ClusterConfig(nodes=3, tasks_per_node=4).world_size == 12


def test_cluster_name_cannot_smuggle_sbatch_options():
    with pytest.raises(ConfigError, match="cluster.name"):
        ClusterConfig(name="x --partition=urgent")


@pytest.mark.parametrize(
    "cluster, fragment",
    [
        (dict(partition="gpu\necho pwned"), "cluster.partition"),
        (dict(account="a'b"), "cluster.account"),
        (dict(qos="x;y"), "cluster.qos"),
        (dict(env={"BAD KEY": "1"}), "not a valid environment variable name"),
    ],
)
def test_values_that_reach_the_batch_script_cannot_carry_shell(cluster, fragment):
    with pytest.raises(ConfigError, match=fragment):
        ClusterConfig(**cluster)


def test_ordinary_site_values_pass():
    ClusterConfig(partition="gpu-a100", account="proj_123", qos="normal", constraint="a100&ib|h100")


def test_validation_reuses_its_schema_without_carrying_values_over():
    """validate() caches the structured schema (sweeps validate every trial); one config must not leak
    into the next."""
    from hpcml.config import TrainJobConfig, validate

    assert validate({"optim": {"lr": 0.5}, "cluster": {"env": {"X": "1"}}}).optim["lr"] == 0.5
    assert validate({}) == TrainJobConfig()
