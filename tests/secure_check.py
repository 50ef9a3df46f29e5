"""The checks every secure-aggregation test makes: a global checkpoint against the plain weighted mean of the same
sites' updates, within the quantisation bound derived in :mod:`fedlora_cli.federation.secure`, and the counts each
site reports beside its vector, computed here from its update."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from fedlora_cli import storage
from fedlora_cli.federation import secure


def plain_mean(parent: Path, updates: dict[str, Path]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """By tensor name: sum_k p_k d_k, where d_k is site k's update minus the parent and p_k = w_k / sum w the plain
    weights (w_k the update's example count, or 1), and the bound of SecAgg+'s result against it.

    The bound: K x step / sum_k r_k (stochastic rounding, less than one step per site; r_k = round(w_k / M x Q) / Q
    the weight SecAgg+ quantises), plus sum_k |r_k / sum r - p_k| x |d_k| (the weights' own rounding)."""
    from fedlora_cli.federation.common import Global

    p = storage.read_global(Path(parent))
    recipe = Global.of(Path(parent)).recipe
    arith = secure.Arithmetic.of(recipe)
    parent_t = storage.load_verified(p.path / storage.ADAPTER_WEIGHTS, p.manifest.tensor_digests, "parent",
                                     framework="numpy")
    read = {cid: storage.read_update(Path(u)) for cid, u in updates.items()}
    weights = {cid: secure.site_weight(recipe, u.manifest.num_examples) for cid, u in read.items()}
    total, ratios = sum(weights.values()), {cid: arith.ratio(w) for cid, w in weights.items()}
    ratio_sum = sum(ratios.values())
    quantisation = len(weights) * arith.step / ratio_sum
    out = {}
    for name in sorted(storage.tensor_header(next(iter(read.values())).tensors_path, "update")):
        base = parent_t[name].astype(np.float64)
        deltas = {cid: storage.load_verified(u.tensors_path, u.manifest.tensor_digests, "update",
                                             framework="numpy")[name].astype(np.float64) - base
                  for cid, u in read.items()}
        mean = sum(weights[c] / total * d for c, d in deltas.items())
        weight_err = sum(abs(ratios[c] / ratio_sum - weights[c] / total) * np.abs(d) for c, d in deltas.items())
        out[name] = (mean, quantisation + weight_err)
    return out


def ulp(values: np.ndarray) -> np.ndarray:
    """One float32 ulp of each value (the stored global's rounding)."""
    return np.spacing(np.abs(values).astype(np.float32)).astype(np.float64)


def assert_global_is_the_weighted_mean(parent: Path, written: Path, updates: dict[str, Path]) -> float:
    """Assert, coordinate by coordinate, |global - (parent + sum_k p_k d_k)| <= the bound of :func:`plain_mean` plus
    one float32 ulp of the stored global. Returns the largest error seen relative to the bound."""
    from fedlora_cli.federation.common import Global

    p, g = storage.read_global(Path(parent)), storage.read_global(Path(written))
    recipe = Global.of(Path(parent)).recipe
    parent_t = storage.load_verified(p.path / storage.ADAPTER_WEIGHTS, p.manifest.tensor_digests, "parent",
                                     framework="numpy")
    new_t = storage.load_verified(g.path / storage.ADAPTER_WEIGHTS, g.manifest.tensor_digests, "global",
                                  framework="numpy")
    weights = {cid: secure.site_weight(recipe, storage.read_update(Path(u)).manifest.num_examples)
               for cid, u in updates.items()}
    assert g.manifest.clients == sorted(updates)
    assert g.manifest.aggregation[secure.MANIFEST_KEY]["weights"] == weights
    worst = 0.0
    for name, (mean, bound) in plain_mean(parent, updates).items():
        got = new_t[name].astype(np.float64)
        bound = bound + ulp(got)
        err = np.abs(got - (parent_t[name].astype(np.float64) + mean))
        assert np.all(err <= bound), f"{name}: error {err.max():.3g} beyond the bound {bound[err > bound].min():.3g}"
        worst = max(worst, float(np.max(err / bound)))
    return worst


def site_counts(parent: Path, update: Path) -> tuple[int, bool]:
    """What a site reports of its update against the global ``parent``: how many values of its difference (clipped
    to federation.norm_bound if it has one, then weighted by r_k) lie beyond +-clipping_range, and whether it
    clipped."""
    from fedlora_cli.federation.common import Global

    g = Global.of(Path(parent))
    recipe, u = g.recipe, storage.read_update(Path(update))
    arith = secure.Arithmetic.of(recipe)
    t = storage.load_verified(u.tensors_path, u.manifest.tensor_digests, "update", framework="numpy")
    diff = np.concatenate([(t[n].astype(np.float64) - g.verified_arrays[n]).ravel() for n in sorted(t)])
    bound, norm = recipe.federation.norm_bound, math.sqrt(float(diff @ diff))
    clipped = bound is not None and norm > bound
    if clipped:
        diff = diff * (bound / norm)
    ratio = arith.ratio(secure.site_weight(recipe, u.manifest.num_examples))
    return int(np.count_nonzero(np.abs(diff * ratio) > arith.clipping_range)), clipped
