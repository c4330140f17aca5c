"""Hydra's basic sweeper without its duplicate composition of every trial.

Before each batch, BasicSweeper composes every trial's config only to fail early, because a launcher
"may be performing this in a different process/machine". hpcml's launcher composes and validates every
trial itself, in this process, before anything is submitted; composing them twice doubled the login-node
time of a large sweep. Everything else (how sweeps expand, batches) is BasicSweeper's.

No `from __future__ import annotations`: see launcher.py.
"""

from collections.abc import Sequence
from dataclasses import dataclass

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper, BasicSweeperConf
from hydra.core.config_store import ConfigStore


@dataclass
class HpcmlSweeperConf(BasicSweeperConf):
    _target_: str = "hydra_plugins.hpcml_launcher.sweeper.HpcmlSweeper"


ConfigStore.instance().store(group="hydra/sweeper", name="hpcml", node=HpcmlSweeperConf, provider="hpcml")


class HpcmlSweeper(BasicSweeper):
    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        """Nothing here: hpcml's launcher composes and validates each trial before submitting any."""
