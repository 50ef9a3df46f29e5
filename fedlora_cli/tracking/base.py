"""What every tracker shares: the :class:`Tracker` protocol, a run's identity, and the one error a missing
tracker package raises."""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from fedlora_cli.errors import FedloraError
from fedlora_cli.storage.files import atomic_file, read_json, write_json
from fedlora_cli.storage.run_layout import TRACKING_DIR

IDENTITY_FILE = "run.json"  # HOME/tracking/run.json: the run's id and name, kept for resumed runs


class Tracker(Protocol):
    """One experiment tracker's run.

    Metric keys are slash-separated and their first part names the step axis: ``round/...`` is logged with the
    round as its step, ``step/<client>/...`` with that client's training step (counted across rounds).
    """

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


def axis_of(key: str) -> str:
    """The step axis of a metric key: its first part (``round`` or ``step``)."""
    return key.split("/", 1)[0]


@dataclass
class RunIdentity:
    """Who a tracked run is: a random id made once and kept in ``HOME/tracking/run.json``, so a resumed run (or
    the next round's command) continues the same tracker run; the experiment is the recipe's name and the run's
    name the folder's.

    ``logged`` records, per tracker, the last round whose round metrics it holds: a resumed simulation reports
    its finished rounds again, and those are not logged twice.
    """

    home: Path
    id: str
    experiment: str
    name: str
    logged: dict[str, int] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return self.home / TRACKING_DIR / IDENTITY_FILE

    @classmethod
    def of(cls, home: Path, experiment: str) -> RunIdentity:
        """The identity kept in ``home``, or a new one (written at once) named after ``experiment`` and ``home``."""
        home = Path(home)
        path = home / TRACKING_DIR / IDENTITY_FILE
        if path.is_file():
            data = read_json(path, "tracking identity")
            try:
                return cls(home, str(data["id"]), str(data["experiment"]), str(data["name"]),
                           {str(k): int(v) for k, v in data.get("logged", {}).items()})
            except (KeyError, TypeError, ValueError, AttributeError):
                raise FedloraError(f"tracking identity {path} is malformed; delete it to start a new tracked run") from None
        run = cls(home, secrets.token_hex(8), experiment, home.resolve().name or "run")
        run.save()
        return run

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(self.path) as tmp:
            write_json(tmp, {"id": self.id, "experiment": self.experiment, "name": self.name, "logged": self.logged})


def safe_name(text: str) -> str:
    """``text`` as one folder name (a recipe's name may hold slashes or spaces)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "run"


def missing_package(name: str, package: str, extra: str) -> FedloraError:
    return FedloraError(f"tracker '{name}' needs the {package} package, which is not installed: "
                        f"pip install 'fedlora[{extra}]'")
