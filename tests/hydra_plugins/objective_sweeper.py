"""A stand-in for a third-party optimizing sweeper (Nevergrad's, Ax's, the old hydra-optuna-sweeper): what
matters to hpcml is that it reads each trial's return value. This one writes them to objectives.json."""

import json
from pathlib import Path

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper


class ObjectiveRecordingSweeper(BasicSweeper):
    def sweep(self, arguments):
        returns = super().sweep(arguments)
        values = [r.return_value for batch in returns for r in batch]
        (Path(self.config.hydra.sweep.dir) / "objectives.json").write_text(json.dumps(values))
        return returns
