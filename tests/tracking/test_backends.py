"""fedlora_cli.tracking.tensorboard, .mlflow and .wandb: each writes what it is given where its reader finds it,
offline, and a reopened run continues the same run."""

from __future__ import annotations

from fedlora_cli.tracking.base import RunIdentity
from fedlora_cli.tracking.mlflow import RUN_ID_TAG, MlflowTracker
from fedlora_cli.tracking.tensorboard import TensorBoardTracker
from fedlora_cli.tracking.wandb import WandbTracker
from tracking.helpers import mlflow_history, mlflow_runs, tensorboard_scalars, wandb_history


def log_twice(cls, home, directory):
    """Two opens of the same run (a run and its resumption), each logging a round and a training step."""
    for round_ in (1, 2):
        tracker = cls(RunIdentity.of(home, "my recipe"), directory)
        tracker.log_metrics(round_, {"round/global_accuracy": round_ / 4, "round/upload_bytes": 1000.0 * round_})
        tracker.log_metrics(3 * round_, {"step/client-0/train_loss": 1 / round_})
        tracker.close()
    return RunIdentity.of(home, "my recipe")


def test_tensorboard_event_files(tmp_path):
    log_twice(TensorBoardTracker, tmp_path / "run", tmp_path / "tb")
    scalars = tensorboard_scalars(tmp_path / "tb" / "tensorboard" / "my-recipe" / "run")
    assert scalars == {"round/global_accuracy": [(1, 0.25), (2, 0.5)], "round/upload_bytes": [(1, 1000.0), (2, 2000.0)],
                       "step/client-0/train_loss": [(3, 1.0), (6, 0.5)]}


def test_an_mlflow_file_store_holds_one_run_continued(tmp_path):
    run = log_twice(MlflowTracker, tmp_path / "run", tmp_path / "run" / "tracking")
    store = tmp_path / "run" / "tracking" / "mlflow"
    assert mlflow_history(store, "my recipe") == {
        "round/global_accuracy": [(1, 0.25), (2, 0.5)], "round/upload_bytes": [(1, 1000.0), (2, 2000.0)],
        "step/client-0/train_loss": [(3, 1.0), (6, 0.5)],
    }
    _, (only,) = mlflow_runs(store, "my recipe")
    assert (only.info.run_name, only.data.tags[RUN_ID_TAG], only.info.status) == ("run", run.id, "FINISHED")


def test_a_wandb_offline_run_continued_under_the_same_id(tmp_path):
    run = log_twice(WandbTracker, tmp_path / "run", tmp_path / "run" / "tracking")
    ids, rows = wandb_history(tmp_path / "run" / "tracking" / "wandb")
    assert ids == {run.id}  # two offline folders (one per open) of one W&B run, which 'wandb sync' joins
    assert rows == [
        {"round/global_accuracy": 0.25, "round/upload_bytes": 1000.0, "round": 1},
        {"step/client-0/train_loss": 1.0, "step": 3},
        {"round/global_accuracy": 0.5, "round/upload_bytes": 2000.0, "round": 2},
        {"step/client-0/train_loss": 0.5, "step": 6},
    ]
