"""Weights & Biases in offline mode: a run folder under ``DIR/wandb/`` that ``wandb sync`` uploads later from a
machine that may. The W&B run id is fedlora's, so a resumed run writes another offline folder of the same run,
which ``wandb sync`` joins. Error reporting is turned off and nothing is sent while fedlora runs.

A W&B run has one step counter that must only grow; fedlora's metrics have two axes (rounds, and each client's
training steps), so each is declared as its own x-axis (``define_metric``) and logged as a value beside the metric.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from fedlora_cli.tracking.base import RunIdentity, axis_of

FOLDER = "wandb"  # W&B itself adds it under the dir it is given


class WandbTracker:
    def __init__(self, run: RunIdentity, directory: Path) -> None:
        os.environ["WANDB_ERROR_REPORTING"] = "false"
        import wandb

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / FOLDER
        settings = wandb.Settings(silent=True, console="off", disable_git=True, save_code=False, x_disable_stats=True,
                                  x_disable_machine_info=True)
        self._run = wandb.init(project=run.experiment, name=run.name, id=run.id, dir=str(directory), mode="offline",
                               resume="allow", settings=settings)
        self._axes: set[str] = set()

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        for axis in {axis_of(key) for key in metrics} - self._axes:
            self._run.define_metric(axis, hidden=True)
            self._run.define_metric(f"{axis}/*", step_metric=axis)
            self._axes.add(axis)
        for axis in {axis_of(key) for key in metrics}:
            self._run.log({**{k: float(v) for k, v in metrics.items() if axis_of(k) == axis}, axis: step})

    def close(self) -> None:
        import wandb

        self._run.finish()
        # finish() can return before W&B's service process has written the run's last records; teardown waits for
        # it (and ends it), so the offline folder is complete when the command is done.
        wandb.teardown()
