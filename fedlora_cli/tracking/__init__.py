"""Experiment tracking: metrics of simulate, train-client, aggregate and evaluate logged to TensorBoard, MLflow or
Weights & Biases, offline only (event files, a file store, an offline W&B run): nothing reaches a network.

``--report-to tensorboard,mlflow`` (or the recipe's ``tracking.report_to``) picks the trackers (:mod:`.fanout`);
each is an optional dependency (``pip install 'fedlora[tensorboard]'``, ``[mlflow]``, ``[wandb]``), imported only
when asked for. One class per backend (:mod:`.tensorboard`, :mod:`.mlflow`, :mod:`.wandb`) implements the
:class:`~.base.Tracker` protocol, ``log_metrics(step, metrics)`` and ``close()``; :mod:`.metrics` says what each
command logs, under the names of ``--json``.

A tracked run lives in a folder, its *home*: a simulate run folder (which a hand-run coordinator's global
checkpoints also use, ``RUN/global/round-NNN``, or else the folder beside them) or a client's state folder
(train-client, evaluate --state). Its files go to ``HOME/tracking/`` unless ``--tracking-dir`` says otherwise;
its identity (``HOME/tracking/run.json``) makes a resumed run, or the next round's command, continue the same
tracker run, named after the recipe and the home folder.
"""

from fedlora_cli.tracking.base import RunIdentity, Tracker
from fedlora_cli.tracking.fanout import (
    BACKENDS, Backend, Trackers, coordinator_home, log_client_round, log_evaluation, open_run, resolve,
)
from fedlora_cli.tracking.metrics import (
    aggregate_metrics, client_round_metrics, evaluation_metrics, round_metrics, step_key, step_logger,
)
from fedlora_cli.tracking.simulation import SimulationTracker

__all__ = [
    "BACKENDS", "Backend", "RunIdentity", "SimulationTracker", "Tracker", "Trackers", "aggregate_metrics",
    "client_round_metrics", "coordinator_home", "evaluation_metrics", "log_client_round", "log_evaluation", "open_run",
    "resolve", "round_metrics", "step_key", "step_logger",
]
