"""MLflow: a file store under ``DIR/mlflow/`` (a ``file:`` URI: no server, no network), one experiment per
recipe, one MLflow run per fedlora run, found again by its ``fedlora.run_id`` tag when the run resumes.

``mlflow ui --backend-store-uri DIR/mlflow`` shows it, and ``MlflowClient(tracking_uri=...)`` reads it back.
MLflow 3 keeps the file store in maintenance mode behind ``MLFLOW_ALLOW_FILE_STORE``; fedlora opts in (unless the
variable is set otherwise), since a file store is what a run folder can hold. MLflow's usage telemetry is turned
off: nothing leaves the machine.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path

from fedlora_cli.errors import FedloraError, first_line
from fedlora_cli.tracking.base import RunIdentity

FOLDER = "mlflow"
RUN_ID_TAG = "fedlora.run_id"


class MlflowTracker:
    def __init__(self, run: RunIdentity, directory: Path) -> None:
        os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self.path = Path(directory) / FOLDER
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            self._client = MlflowClient(tracking_uri=self.path.resolve().as_uri())
            self.run_id = self._run_id(run)
        except MlflowException as exc:
            raise FedloraError(f"MLflow file store {self.path}: {first_line(exc)}") from None

    def _run_id(self, run: RunIdentity) -> str:
        client = self._client
        experiment = client.get_experiment_by_name(run.experiment)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(run.experiment)
        found = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_ID_TAG}` = '{run.id}'", max_results=1)
        if found:
            client.update_run(found[0].info.run_id, status="RUNNING")
            return found[0].info.run_id
        return client.create_run(experiment_id, run_name=run.name, tags={RUN_ID_TAG: run.id}).info.run_id

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def close(self) -> None:
        self._client.set_terminated(self.run_id)
