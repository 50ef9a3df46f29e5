"""fedlora_cli.tracking.simulation: a simulation's trackers, and a resumed simulation continuing the same tracker
runs without logging a round twice."""

from __future__ import annotations

import pytest
from conftest import QuietReporter

from fedlora_cli import tracking
from fedlora_cli.federation import simulate
from tracking.helpers import mlflow_history, mlflow_runs, wandb_history


class StopAfterRound1(QuietReporter):
    def round_done(self, row):
        if row["round"] == 1:
            raise KeyboardInterrupt


def test_an_interrupted_simulation_resumes_into_the_same_tracker_run(make_recipe, tmp_path):
    recipe = make_recipe("fedavg")
    run = tmp_path / "run"
    with tracking.open_run(("mlflow", "wandb"), run, recipe.name) as trackers, pytest.raises(KeyboardInterrupt):
        simulate.simulate(recipe, run, tracking.SimulationTracker(StopAfterRound1(), trackers, private=False))
    with tracking.open_run(("mlflow", "wandb"), run, recipe.name) as trackers:
        rows = simulate.simulate(recipe, run, tracking.SimulationTracker(QuietReporter(), trackers, private=False))
    history = mlflow_history(run / "tracking" / "mlflow", recipe.name)  # one MLflow run (mlflow_history checks)
    for key in ("global_accuracy", "global_loss", "train_loss", "upload_bytes", "seconds"):
        assert history[f"round/{key}"] == [(row["round"], pytest.approx(row[key])) for row in rows]
    # Three steps a round: round 1's before the interruption, round 2's after, on one axis.
    assert [step for step, _ in history["step/client-0/train_loss"]] == [1, 2, 3, 4, 5, 6]
    _, (only,) = mlflow_runs(run / "tracking" / "mlflow", recipe.name)
    ids, wandb_rows = wandb_history(run / "tracking" / "wandb")
    assert ids == {only.data.tags["fedlora.run_id"]}
    assert [r["round"] for r in wandb_rows if "round" in r] == [1, 2]  # round 1 once, though reported twice
