"""The folder tree of a federation run on one machine (``fedlora simulate``)::

    RUN/
      recipe.yaml                     the validated recipe (its digest pins the run)
      data/                           fedlora partition output: partition.json, client-*.parquet, test.parquet
      global/round-000/ ...           global checkpoints (PEFT folder + fedlora.json)
      global/dp-fedavg-ledger-*.json  the coordinator's DP-FedAvg releases (with server_privacy only)
      updates/round-001/client-0/     client updates of round 1
      clients/client-0/round-001/     client state (never sent)
      metrics/round-001.json          evaluation of each round

One class answers where each thing lives, for simulate, export and the privacy report alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedlora_cli.storage.checkpoints import round_dirname

RECIPE_FILE = "recipe.yaml"


DATA_DIR = "data"


GLOBAL_DIR = "global"


UPDATES_DIR = "updates"


CLIENTS_DIR = "clients"


METRICS_DIR = "metrics"


CURVES_PNG = "rounds.png"


@dataclass
class RunLayout:
    root: Path

    @property
    def data(self) -> Path:
        return self.root / DATA_DIR

    def global_checkpoint(self, round_: int) -> Path:
        return self.root / GLOBAL_DIR / round_dirname(round_)

    def update(self, round_: int, client_id: str) -> Path:
        return self.root / UPDATES_DIR / round_dirname(round_) / client_id

    def state(self, client_id: str) -> Path:
        return self.root / CLIENTS_DIR / client_id

    def metrics(self, round_: int) -> Path:
        return self.root / METRICS_DIR / f"{round_dirname(round_)}.json"

    @property
    def curves(self) -> Path:
        """The learning curves fedlora simulate draws after every run (PNG)."""
        return self.root / METRICS_DIR / CURVES_PNG
