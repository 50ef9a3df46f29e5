"""Aggregation: pure functions over named tensors (:mod:`.functions`) and the strategies built on them.

The strategies (``federation.aggregation``), one class each (interface in :mod:`.strategy`)::

    mean          Mean          FedAvg / FedIT: the weighted mean of every sent tensor (streams)
    svd           Svd           FlexLoRA: truncated SVD of the weighted mean of the products B_k A_k
    exact         Exact         FedEx-LoRA: means of A and B plus a residual folded into the base weights
    median        Median        coordinate-wise median (robust)
    trimmed-mean  TrimmedMean   coordinate-wise trimmed mean (robust)

The norm bound (:mod:`.norm_bound`) screens updates in front of any of them; DP-FedAvg
(:mod:`fedlora_cli.privacy.dp_fedavg`) wraps one, and a server optimiser (:mod:`.server_optimizers`: FedAvgM,
FedAdam, FedYogi, FedAdagrad) wraps either.
"""

from typing import Any

from fedlora_cli.aggregation.exact import Exact
from fedlora_cli.aggregation.functions import (
    Factors, LayerReport, Tensors, accumulator_dtype, client_weights, clip_to_norm, clipped_delta, coordinate_median,
    exact_layer, nonfinite, svd_layer, to_rank, trim_count, trimmed_mean, update_norm, weighted_mean,
)
from fedlora_cli.aggregation.mean import Mean
from fedlora_cli.aggregation.median import Median
from fedlora_cli.aggregation.norm_bound import NormBound
from fedlora_cli.aggregation.server_optimizers import SERVER_OPTIMIZERS, ServerOptimizer
from fedlora_cli.aggregation.strategy import Aggregate, Contribution, Contributions, PrivacyRelease, RoundSpec, Strategy
from fedlora_cli.aggregation.svd import Svd
from fedlora_cli.aggregation.trimmed import TrimmedMean

STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in (Mean, Svd, Exact, Median, TrimmedMean)}


def make_strategy(federation: Any) -> Strategy:
    """The strategy a validated recipe's federation section names, with its settings."""
    return STRATEGIES[federation.aggregation].from_recipe(federation)


__all__ = [
    "SERVER_OPTIMIZERS", "STRATEGIES", "accumulator_dtype", "Aggregate", "client_weights", "clip_to_norm", "clipped_delta",
    "Contribution", "Contributions", "coordinate_median", "Exact", "exact_layer", "Factors", "LayerReport",
    "make_strategy", "Mean", "Median", "nonfinite", "NormBound", "PrivacyRelease", "RoundSpec", "ServerOptimizer",
    "Strategy", "Svd", "svd_layer", "Tensors", "to_rank", "trim_count", "trimmed_mean", "TrimmedMean",
    "update_norm", "weighted_mean",
]
