"""FlexLoRA (Bai et al., NeurIPS 2024, arXiv 2402.11505): per layer, the weighted sum of the clients' effective
updates M = sum_k p_k s_k B_k A_k, then a truncated SVD back to the global rank r.

Clients may train lower ranks (HetLoRA's setting, Cho et al. 2024; ``adapter.client_ranks``); each receives the
global truncated to its own rank. M is kept as the clients' factors side by side, never as a dense (out x in) matrix
when their ranks together are smaller (:func:`.functions.svd_layer`).
"""

from __future__ import annotations

from fedlora_cli.aggregation.functions import svd_layer
from fedlora_cli.aggregation.products import ProductStrategy


class Svd(ProductStrategy):
    name = "svd"
    mixes_ranks = True

    def combine(self, layer, a_name, b_name, factors, scale, spec, result) -> None:
        result.tensors[a_name], result.tensors[b_name], result.layers[layer] = svd_layer(factors, spec.rank, scale)
