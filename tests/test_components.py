"""User components (`_target_` nodes) are checked before submission: from their source where it shows the
signature, by importing them where it does not, and the verdict is the callable's own either way."""

import sys
import textwrap

import pytest

from hpcml import components
from hpcml.errors import ConfigError


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A user's package on sys.path, as their project directory would be."""
    pkg = tmp_path / "myproj"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from .nets import Net\nfrom .more import *\n")
    (pkg / "nets.py").write_text(
        textwrap.dedent(
            """
            IMPORTED = True

            class Net:
                def __init__(self, channels, depth=2, *, dropout=0.0):
                    pass

            def make(width, /, scale=1.0, **extra):
                return width

            class Inherits(Net):
                pass
            """
        )
    )
    (pkg / "more.py").write_text("def starred(alpha, beta=1):\n    return alpha\n")
    (pkg / "broken.py").write_text("raise RuntimeError('no GPU driver here')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "myproj"
    for name in [m for m in sys.modules if m == "myproj" or m.startswith("myproj.")]:
        del sys.modules[name]


def test_a_good_node_is_checked_from_source_without_importing_it(project):
    components.check("model", {"_target_": "myproj.Net", "channels": 3, "dropout": 0.1})
    components.check("model", {"_target_": "myproj.nets.make", "_args_": [4], "scale": 2, "anything": 1})
    components.check("model", {"_target_": "myproj.starred", "alpha": 1})
    assert "myproj" not in sys.modules and "myproj.nets" not in sys.modules


@pytest.mark.parametrize(
    "node, message",
    [
        ({"_target_": "myproj.Net", "channel": 3}, "it takes no argument 'channel' (did you mean 'channels'?)"),
        ({"_target_": "myproj.Net"}, "it needs 'channels', which the config does not give"),
        ({"_target_": "myproj.starred", "gamma": 1, "alpha": 1}, "it takes no argument 'gamma'"),
        ({"_target_": "myproj.nets.Nope"}, "myproj.nets has no attribute 'Nope'"),
        ({"_target_": "myproj.missing.Net"}, "myproj has no attribute 'missing'. Fix the name."),
        ({"_target_": "myproj.broken.Net"}, "importing myproj.broken failed: RuntimeError('no GPU driver here')"),
        # The class inherits its __init__: only importing it shows the signature, and then it is enforced.
        ({"_target_": "myproj.nets.Inherits", "depth": 3}, "it needs 'channels'"),
        ({"_target_": "myproj.nets.IMPORTED"}, "is not callable"),
    ],
)
def test_a_node_that_cannot_be_built_is_refused_naming_key_reason_and_fix(project, node, message):
    with pytest.raises(ConfigError) as refused:
        components.check("model", node)
    assert str(refused.value).startswith(f"model._target_={node['_target_']}") and message in str(refused.value)


def test_launch_check_components_false_skips_the_import_a_login_node_cannot_do(project):
    """A module that raises on import here (no GPU driver) passes with the check off; the node shape is still
    checked, and a config built with the check on refuses it."""
    from hpcml.config import TrainJobConfig, to_plain_dict, validate

    broken = {"_target_": "myproj.broken.Net", "channels": 3}
    components.check("model", broken, signature=False)
    with pytest.raises(ConfigError, match="needs a _target_|must be a node with a _target_"):
        components.check("model", {"channels": 3, "_target_": ""}, signature=False)
    plain = to_plain_dict(TrainJobConfig())
    plain["model"] = broken
    with pytest.raises(ConfigError, match="importing myproj.broken failed"):
        validate(plain)
    plain["launch"]["check_components"] = False
    assert validate(plain).model["_target_"] == "myproj.broken.Net"


def test_positional_arguments_hpcml_passes_are_counted():
    components.check("optim", {"_target_": "torch.optim.SGD", "lr": 0.1}, supplied=1)
    with pytest.raises(ConfigError, match="it needs 'params'"):
        components.check("optim", {"_target_": "torch.optim.SGD", "lr": 0.1})  # as if hpcml passed nothing
    with pytest.raises(ConfigError, match="'optimizer' is passed by hpcml itself"):
        components.check("schedule", {"_target_": "torch.optim.lr_scheduler.StepLR", "optimizer": 1, "step_size": 5}, 1)


def test_nested_nodes_are_checked_by_their_own_key():
    with pytest.raises(
        ConfigError, match=r"^task.loss._target_=torch.nn.CrossEntropyLoss: it takes no argument 'smoothing'"
    ):
        components.check(
            "task",
            {
                "_target_": "hpcml.compute.tasks.Classification",
                "loss": {"_target_": "torch.nn.CrossEntropyLoss", "smoothing": 0.1},
            },
        )


@pytest.mark.parametrize("node", [None, {}, {"lr": 0.1}, {"_target_": ""}, "torch.optim.SGD"])
def test_a_node_without_a_target_is_refused(node):
    with pytest.raises(ConfigError, match="must be a node with a _target_"):
        components.check("optim", node)


@pytest.mark.parametrize(
    "target",
    [
        "torch.optim.SGD",
        "torch.optim.AdamW",
        "torch.optim.lr_scheduler.OneCycleLR",
        "torch.nn.CrossEntropyLoss",
        "torch.nn.Linear",
        "hpcml.compute.models.MLP",
        "hpcml.compute.datasets.synthetic",
        "hpcml.compute.tasks.Classification",
    ],
)
def test_what_the_source_shows_is_what_inspect_sees(target):
    """The source reading is a shortcut, never a different answer: for every built-in and common torch
    target it finds, it agrees with inspect.signature on the imported callable."""
    from_source = components._signature_from_source(target)
    assert from_source is not None, f"{target}: read by importing, the slow way"
    assert from_source == components._signature_from_import("x", target)


def test_building_names_the_key_when_the_callable_raises():
    with pytest.raises(
        ConfigError,
        match=r"^optim: could not build torch.optim.SGD: ValueError\('Invalid learning rate: -1.0'\)\. Fix the arguments under optim\.",
    ):
        components.build(
            "optim", {"_target_": "torch.optim.SGD", "lr": -1.0}, [__import__("torch").zeros(1, requires_grad=True)]
        )
