"""A simulation's trackers: a reporter (:class:`fedlora_cli.federation.rounds.Reporter`) that passes every
report on to the one it wraps and logs each round's row and, unless the clients train under DP-SGD, each
client's training loss per step."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fedlora_cli.tracking.fanout import Trackers
from fedlora_cli.tracking.metrics import round_metrics, step_logger


class SimulationTracker:
    def __init__(self, inner: Any, trackers: Trackers, private: bool) -> None:
        self.inner, self.trackers = inner, trackers
        # simulate's trackers are the coordinator's view: a DP-SGD client's loss stays with that client.
        self.private = private

    def stage(self, text: str) -> None:
        self.inner.stage(text)

    def warn(self, text: str) -> None:
        self.inner.warn(text)

    def training(self, round_: int, client_id: str) -> Callable[[int, int, float], None] | None:
        progress = self.inner.training(round_, client_id)
        if self.private or not self.trackers:
            return progress
        return step_logger(self.trackers.log_metrics, client_id, round_, progress)

    def done_training(self) -> None:
        self.inner.done_training()

    def round_done(self, row: dict[str, Any]) -> None:
        self.trackers.log_round(row["round"], round_metrics(row, self.private))
        self.inner.round_done(row)
