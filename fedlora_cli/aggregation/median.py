"""Coordinate-wise median (Yin et al., "Byzantine-Robust Distributed Learning", ICML 2018).

Equal client weights on purpose: a malicious client can claim any number of examples. Needs every client's
value of a coordinate at once, so memory grows with the clients, one tensor name at a time.
"""

from __future__ import annotations

from fedlora_cli.aggregation.functions import coordinate_median
from fedlora_cli.aggregation.strategy import Aggregate, Contributions, RoundSpec, Strategy


class Median(Strategy):
    name = "median"
    needs_each = "every update's value of each coordinate"

    def aggregate(self, contributions: Contributions, spec: RoundSpec) -> Aggregate:
        accepted = contributions.drain()
        return Aggregate({name: coordinate_median([c.get(name) for c in accepted]) for name in spec.sent})
