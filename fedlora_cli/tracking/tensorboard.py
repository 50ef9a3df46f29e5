"""TensorBoard: event files under ``DIR/tensorboard/<experiment>/<run name>/``, written by
``torch.utils.tensorboard.SummaryWriter`` (which needs the ``tensorboard`` package). ``tensorboard --logdir
DIR/tensorboard`` shows every run written there; a resumed run adds event files to the same folder."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from fedlora_cli.tracking.base import RunIdentity, safe_name

FOLDER = "tensorboard"


class TensorBoardTracker:
    def __init__(self, run: RunIdentity, directory: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.path = Path(directory) / FOLDER / safe_name(run.experiment) / safe_name(run.name)
        # Flushed every 10 s, so a TensorBoard watching a long run sees its curves grow.
        self._writer = SummaryWriter(log_dir=str(self.path), flush_secs=10)

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        for key, value in metrics.items():
            self._writer.add_scalar(key, value, step)

    def close(self) -> None:
        self._writer.close()
