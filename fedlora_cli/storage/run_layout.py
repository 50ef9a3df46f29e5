"""The folder tree of a federation run on one machine (``fedlora simulate``)::

    RUN/
      recipe.yaml                     the validated recipe (its digest pins the run)
      data/                           fedlora partition output: partition.json, client-*.parquet, test.parquet
      global/round-000/ ...           global checkpoints (PEFT folder + fedlora.json)
      global/dp-fedavg-ledger-*.json  the coordinator's DP-FedAvg releases (with server_privacy only)
      updates/round-001/client-0/     client updates of round 1
      clients/client-0/round-001/     client state (never sent)
      metrics/round-001.json          evaluation of each round
      metrics/rounds.json, rounds.png the table of rounds (each round's row) and its learning curves
      tracking/                       experiment trackers' files (simulate --report-to; see fedlora_cli.tracking)

One class answers where each thing lives, for simulate, export and the privacy report alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedlora_cli.storage.checkpoints import GlobalCheckpoint, round_dirname

RECIPE_FILE = "recipe.yaml"
DATA_DIR = "data"
GLOBAL_DIR = "global"
UPDATES_DIR = "updates"
CLIENTS_DIR = "clients"
METRICS_DIR = "metrics"
CURVES_PNG = "rounds.png"
ROUNDS_JSON = "rounds.json"
# Experiment trackers' files: in a run folder, and in a client's state folder for train-client's own tracking.
TRACKING_DIR = "tracking"


@dataclass
class RunLayout:
    root: Path

    @classmethod
    def of_global(cls, checkpoint: Path | GlobalCheckpoint) -> RunLayout | None:
        """The run a global checkpoint lives in (RUN/global/round-NNN, symlinks resolved), or None for a
        checkpoint kept anywhere else."""
        path = checkpoint.path if isinstance(checkpoint, GlobalCheckpoint) else Path(checkpoint)
        folder = path.resolve().parent
        return cls(folder.parent) if folder.name == GLOBAL_DIR else None

    def is_run(self) -> bool:
        """Whether the folder has the clients/ or global/ folder of a run, even one that stopped early."""
        return (self.root / CLIENTS_DIR).is_dir() or (self.root / GLOBAL_DIR).is_dir()

    @property
    def data(self) -> Path:
        return self.root / DATA_DIR

    def global_checkpoint(self, round_: int) -> Path:
        return self.root / GLOBAL_DIR / round_dirname(round_)

    def update(self, round_: int, client_id: str) -> Path:
        return self.root / UPDATES_DIR / round_dirname(round_) / client_id

    def state(self, client_id: str) -> Path:
        return self.root / CLIENTS_DIR / client_id

    def client_states(self) -> list[Path]:
        """Everything in clients/, sorted: one state folder per client. A stray file is listed too, for the
        caller to skip or refuse."""
        folder = self.root / CLIENTS_DIR
        return sorted(folder.iterdir()) if folder.is_dir() else []

    def client_updates(self) -> list[Path]:
        """Every client update folder in updates/, in round order (by number), then by client id."""
        rounds = [p for p in (self.root / UPDATES_DIR).glob("round-*") if p.name[6:].isdigit()]
        return [u for r in sorted(rounds, key=lambda p: int(p.name[6:])) for u in sorted(r.iterdir()) if u.is_dir()]

    def global_checkpoints(self) -> list[Path]:
        """The round folders in global/, in round order (by number: round-1000 comes after round-999)."""
        folder = self.root / GLOBAL_DIR
        rounds = [p for p in folder.glob("round-*") if p.name[6:].isdigit()] if folder.is_dir() else []
        return sorted(rounds, key=lambda p: int(p.name[6:]))

    def metrics(self, round_: int) -> Path:
        return self.root / METRICS_DIR / f"{round_dirname(round_)}.json"

    @property
    def tracking(self) -> Path:
        """The experiment trackers' files (``--report-to``) and the run's tracking identity."""
        return self.root / TRACKING_DIR

    @property
    def curves(self) -> Path:
        """The learning curves fedlora simulate draws after every run, and the Flower server app after every round
        (PNG)."""
        return self.root / METRICS_DIR / CURVES_PNG

    @property
    def rounds(self) -> Path:
        """Every round's row (the table of rounds, as ``simulate --json`` prints it), written as each run or round
        ends."""
        return self.root / METRICS_DIR / ROUNDS_JSON
