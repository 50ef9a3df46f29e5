"""FedEx-LoRA (Singhal et al., ACL 2025, arXiv 2410.09432): A and B are averaged as in FedIT and the residual
s (sum_k p_k B_k A_k - avg(B) avg(A)) is folded into a dense per-layer correction of the base weight, so the
global update is exactly the weighted mean of the clients' updates. Every client trains the same rank."""

from __future__ import annotations

from fedlora_cli.aggregation.functions import exact_layer
from fedlora_cli.aggregation.products import ProductStrategy


class Exact(ProductStrategy):
    name = "exact"

    def combine(self, layer, a_name, b_name, factors, scale, spec, result) -> None:
        a, b, residual, report = exact_layer(factors, scale)
        result.tensors[a_name], result.tensors[b_name] = a, b
        result.residuals[layer], result.layers[layer] = residual, report
