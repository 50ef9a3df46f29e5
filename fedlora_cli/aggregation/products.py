"""Strategies over the products B_k A_k of LoRA-type adapters, one adapted layer at a time (:mod:`.svd`,
:mod:`.exact`).

They first screen every update (one at a time), then read the factors back one layer at a time; a sent tensor
that is not a factor (a shared head) gets the plain weighted mean. The math is in :mod:`.functions`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from fedlora_cli.aggregation.functions import weighted_mean
from fedlora_cli.aggregation.strategy import Aggregate, Contribution, Contributions, RoundSpec, Strategy, normalised

if TYPE_CHECKING:
    import numpy as np


class ProductStrategy(Strategy):
    """Per adapted layer, combines the clients' factors (A_k, B_k, p_k, s_k) in :meth:`combine`."""

    needs_factors = True
    optimisable = False
    needs_each = "each update's product B_k A_k"

    def aggregate(self, contributions: Contributions, spec: RoundSpec) -> Aggregate:
        accepted = contributions.drain()
        weights = normalised(accepted)
        scale = spec.kind.scale(spec.alpha, spec.rank)
        scales = [spec.kind.scale(spec.alpha, spec.rank_for(c.client_id)) for c in accepted]
        layers = spec.kind.layers(spec.sent)
        result = Aggregate({})
        for layer, (a_name, b_name) in layers.items():
            factors = ((c.get(a_name), c.get(b_name), w, s) for c, w, s in zip(accepted, weights, scales))
            self.combine(layer, a_name, b_name, factors, scale, spec, result)
        in_layers = {name for pair in layers.values() for name in pair}
        for name in spec.sent:
            if name not in in_layers:  # the head, when it is shared: a plain weighted mean
                result.tensors[name] = _mean_of(accepted, weights, name)
        return result

    def combine(self, layer: str, a_name: str, b_name: str, factors, scale: float, spec: RoundSpec,
                result: Aggregate) -> None:
        raise NotImplementedError


def _mean_of(accepted: Sequence[Contribution], weights: Sequence[float], name: str) -> np.ndarray:
    return weighted_mean(({name: c.get(name)}, w) for c, w in zip(accepted, weights))[name]
