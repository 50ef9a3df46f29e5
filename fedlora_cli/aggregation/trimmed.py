"""Coordinate-wise trimmed mean (Yin et al., ICML 2018): drop the floor(beta K) smallest and largest values of
every coordinate, average the rest. Equal client weights, as for the median; default beta 0.25
(``federation.trim_fraction``)."""

from __future__ import annotations

from typing import Any

from fedlora_cli.aggregation.functions import trim_count, trimmed_mean
from fedlora_cli.aggregation.strategy import Aggregate, Contributions, RoundSpec, Strategy


class TrimmedMean(Strategy):
    name = "trimmed-mean"
    needs_each = "every update's value of each coordinate"

    def __init__(self, fraction: float) -> None:
        self.fraction = fraction

    @classmethod
    def from_recipe(cls, federation: Any) -> TrimmedMean:
        return cls(federation.trim_fraction)

    def check_count(self, clients: int, label: str) -> None:
        trim_count(self.fraction, clients, label)

    def aggregate(self, contributions: Contributions, spec: RoundSpec) -> Aggregate:
        accepted = contributions.drain()
        trim = trim_count(self.fraction, len(accepted))
        return Aggregate({name: trimmed_mean([c.get(name) for c in accepted], trim) for name in spec.sent})

    def describe(self) -> dict[str, object]:
        return {"strategy": self.name, "trim_fraction": self.fraction}
