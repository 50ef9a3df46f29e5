"""The trackers a command was asked for (``--report-to`` or the recipe's ``tracking.report_to``), and the fan-out
that logs every metric to each of them.

Each backend is an optional dependency: choosing it checks that its package is installed (one error line naming
the extra to install), and its package is imported only when its tracker opens.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedlora_cli.errors import FedloraError
from fedlora_cli.storage.run_layout import TRACKING_DIR, RunLayout
from fedlora_cli.tracking.base import RunIdentity, Tracker, missing_package
from fedlora_cli.tracking.metrics import client_round_metrics, evaluation_metrics
from fedlora_cli.tracking.mlflow import MlflowTracker
from fedlora_cli.tracking.tensorboard import TensorBoardTracker
from fedlora_cli.tracking.wandb import WandbTracker

if TYPE_CHECKING:
    from fedlora_cli.recipe import Recipe

NONE = "none"  # --report-to none: no tracker, whatever the recipe says


@dataclass(frozen=True)
class Backend:
    """A kind of tracker: its name in ``--report-to``, the package it needs and the fedlora extra installing it."""

    name: str
    label: str
    package: str  # the distribution a person installs
    module: str  # what must be importable
    extra: str  # pip install 'fedlora[extra]'
    tracker: Any  # the Tracker class, built as tracker(run, directory)

    def installed(self) -> bool:
        return importlib.util.find_spec(self.module) is not None

    def check(self) -> None:
        if not self.installed():
            raise missing_package(self.name, self.package, self.extra)

    def open(self, run: RunIdentity, directory: Path) -> Tracker:
        self.check()
        try:
            return self.tracker(run, directory)
        except ImportError:  # installed, but something it needs is not
            raise missing_package(self.name, self.package, self.extra) from None


BACKENDS: dict[str, Backend] = {
    "tensorboard": Backend("tensorboard", "TensorBoard", "tensorboard", "tensorboard", "tensorboard", TensorBoardTracker),
    "mlflow": Backend("mlflow", "MLflow", "mlflow-skinny", "mlflow", "mlflow", MlflowTracker),
    "wandb": Backend("wandb", "Weights & Biases (offline)", "wandb", "wandb", "wandb", WandbTracker),
}


def resolve(option: str | None, recipe: Recipe | None = None) -> tuple[str, ...]:
    """The trackers asked for: ``--report-to`` (comma-separated, or 'none') over the recipe's tracking.report_to.
    Refuses an unknown name and a tracker whose package is missing, before any work is done."""
    if option is None:
        names = list(recipe.tracking.report_to) if recipe is not None and recipe.tracking is not None else []
    elif option.strip().lower() == NONE:
        names = []
    else:
        names = [name.strip().lower() for name in option.split(",") if name.strip()]
        for name in names:
            if name not in BACKENDS:
                raise FedloraError(f"--report-to: unknown tracker '{name}' (known: {', '.join(BACKENDS)}, or {NONE})")
    names = list(dict.fromkeys(names))
    for name in names:
        BACKENDS[name].check()
    return tuple(names)


def coordinator_home(global_checkpoint: Path) -> Path:
    """Where the coordinator's run is tracked: the run folder its global checkpoints live in
    (``RUN/global/round-NNN``), or else the folder holding the global checkpoint."""
    layout = RunLayout.of_global(Path(global_checkpoint))
    return layout.root if layout is not None else Path(global_checkpoint).resolve().parent


class Trackers:
    """The fan-out: each metric to every tracker asked for.

    Nothing is opened (and nothing written) before the first metric arrives, so a command that fails its checks
    leaves no tracking files, and a simulation's trackers open only after ``--overwrite`` emptied the run folder.
    The trackers write under ``directory`` (default ``HOME/tracking``); the run's identity is always kept in
    ``HOME/tracking``, the folder whose run it is.
    """

    def __init__(self, names: Sequence[str], home: Path, experiment: str, directory: Path | None = None) -> None:
        self.names = tuple(names)
        self.home, self.experiment = Path(home), experiment
        self.directory = Path(directory) if directory is not None else self.home / TRACKING_DIR
        self.run: RunIdentity | None = None
        self._open: dict[str, Tracker] = {}

    def __bool__(self) -> bool:
        return bool(self.names)

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _trackers(self) -> dict[str, Tracker]:
        if self.run is None:
            run = RunIdentity.of(self.home, self.experiment)
            try:
                for name in self.names:
                    self._open[name] = BACKENDS[name].open(run, self.directory)
            except BaseException:
                self.close()
                raise
            self.run = run
        return self._open

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.names or not metrics:
            return
        for tracker in self._trackers().values():
            tracker.log_metrics(step, metrics)

    def log_round(self, round_: int, metrics: Mapping[str, float]) -> None:
        """A round's metrics, to each tracker that does not hold them yet (a resumed simulation reports its
        finished rounds again)."""
        if not self.names or not metrics:
            return
        trackers = self._trackers()
        for name, tracker in trackers.items():
            if round_ > self.run.logged.get(name, 0):
                tracker.log_metrics(round_, metrics)
                self.run.logged[name] = round_
        self.run.save()

    def close(self) -> None:
        errors = []
        for tracker in self._open.values():
            try:
                tracker.close()
            except Exception as exc:  # noqa: BLE001 - close the others all the same, then raise the first
                errors.append(exc)
        self._open = {}
        if errors:
            raise errors[0]


def open_run(names: Sequence[str], home: Path, experiment: str, directory: Path | None = None) -> Trackers:
    """The trackers ``names`` (from :func:`resolve`) of the run kept in ``home``, named after ``experiment`` (the
    recipe's name) and the folder ``home``; no names give a fan-out that logs nothing."""
    return Trackers(names, home, experiment, directory)


def log_client_round(trackers: Trackers, round_: int, written: Any) -> None:
    """train-client's round in the client's own run: its upload and epsilon, and its loss as this client saw it
    (under DP-SGD the client update does not carry it, the client state does); nothing for an update sent again
    rather than trained (``written``: what :func:`fedlora_cli.federation.site_round` returned)."""
    if not written.resent:
        trackers.log_metrics(round_, client_round_metrics(written.update.manifest, written.state.manifest.loss))


def log_evaluation(
    names: Sequence[str], metrics: Mapping[str, Any], global_checkpoint: Path, state_dir: Path | None, experiment: str,
    directory: Path | None = None,
) -> None:
    """evaluate's scores (:func:`~fedlora_cli.tracking.metrics.evaluation_metrics`; the validation split's under
    ``validation_``) at the checkpoint's round: in the client's run with ``state_dir`` (personalised), else in the
    coordinator's (:func:`coordinator_home`)."""
    home = state_dir if state_dir is not None else coordinator_home(global_checkpoint)
    with open_run(names, home, experiment, directory) as tracked:
        tracked.log_metrics(metrics["round"], evaluation_metrics(metrics))
        if "validation" in metrics:
            tracked.log_metrics(metrics["round"], evaluation_metrics(metrics["validation"], "validation_"))
