"""The check every secure-aggregation test makes: a global checkpoint against the plain weighted mean of the same
sites' updates, within the quantisation bound derived in :mod:`fedlora_cli.federation.secure`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedlora_cli import storage
from fedlora_cli.federation import secure


def assert_global_is_the_weighted_mean(parent: Path, written: Path, updates: dict[str, Path]) -> float:
    """Assert, coordinate by coordinate, |global - (parent + sum_k p_k d_k)| <= the bound, where d_k is site k's
    update minus the parent and p_k = w_k / sum w the plain weights (w_k the update's example count, or 1).

    The bound: K x step / sum_k r_k (stochastic rounding, less than one step per site; r_k = round(w_k / M x Q) / Q
    the weight SecAgg+ quantises), plus sum_k |r_k / sum r - p_k| x |d_k| (the weights' own rounding), plus one
    float32 ulp of the stored global. Returns the largest error seen relative to the bound."""
    p, g = storage.read_global(Path(parent)), storage.read_global(Path(written))
    from fedlora_cli.federation.common import Global

    recipe = Global.of(Path(parent)).recipe
    arith = secure.Arithmetic.of(recipe)
    parent_t = storage.load_verified(p.path / storage.ADAPTER_WEIGHTS, p.manifest.tensor_digests, "parent",
                                     framework="numpy")
    new_t = storage.load_verified(g.path / storage.ADAPTER_WEIGHTS, g.manifest.tensor_digests, "global",
                                  framework="numpy")
    read = {cid: storage.read_update(Path(u)) for cid, u in updates.items()}
    weights = {cid: secure.site_weight(recipe, u.manifest.num_examples) for cid, u in read.items()}
    assert g.manifest.clients == sorted(updates)
    assert g.manifest.aggregation[secure.MANIFEST_KEY]["weights"] == weights
    total, ratios = sum(weights.values()), {cid: arith.ratio(w) for cid, w in weights.items()}
    ratio_sum = sum(ratios.values())
    quantisation = len(weights) * arith.step / ratio_sum
    worst = 0.0
    for name in sorted(u for u in storage.tensor_header(next(iter(read.values())).tensors_path, "update")):
        base = parent_t[name].astype(np.float64)
        deltas = {cid: storage.load_verified(u.tensors_path, u.manifest.tensor_digests, "update",
                                             framework="numpy")[name].astype(np.float64) - base
                  for cid, u in read.items()}
        plain = base + sum(weights[c] / total * d for c, d in deltas.items())
        weight_err = sum(abs(ratios[c] / ratio_sum - weights[c] / total) * np.abs(d) for c, d in deltas.items())
        got = new_t[name].astype(np.float64)
        bound = quantisation + weight_err + np.spacing(np.abs(got).astype(np.float32)).astype(np.float64)
        err = np.abs(got - plain)
        assert np.all(err <= bound), f"{name}: error {err.max():.3g} beyond the bound {bound[err > bound].min():.3g}"
        worst = max(worst, float(np.max(err / bound)))
    return worst
