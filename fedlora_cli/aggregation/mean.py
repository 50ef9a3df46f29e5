"""FedAvg (McMahan et al., AISTATS 2017): the weighted mean of every sent tensor, sum_k p_k T_k.

On LoRA's A and B this is FedIT, the baseline every method compares against. Streams one client update at a
time: memory is one running sum, flat in the number of clients. When the norm bound rejected some updates,
the mean is renormalised over the weights of those that stayed.
"""

from __future__ import annotations

from fedlora_cli.aggregation.strategy import Aggregate, Contributions, RoundSpec, Strategy


class Mean(Strategy):
    name = "mean"
    linear = True

    def aggregate(self, contributions: Contributions, spec: RoundSpec) -> Aggregate:
        return Aggregate(contributions.weighted_mean())
