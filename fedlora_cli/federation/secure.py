"""Secure aggregation (``federation.secure_aggregation``): the coordinator learns only the weighted sum.

The protocol is Flower's SecAgg+ (Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic
Overhead", CCS 2020; ``flwr.server.workflow.SecAggPlusWorkflow`` and ``flwr.client.mod.secaggplus_mod``, run by
:mod:`fedlora_cli.flower.secure`); fedlora writes no cryptography. This module is the arithmetic around it, the same
on every path:

- at a site (:func:`site_vector`): the client update is checked as the coordinator would check it (digests,
  finite values, names and shapes, its parent), its difference from the received global is taken in float64 and
  clipped to the site's bound (``federation.norm_bound``; under DP-FedAvg the clip norm less the quantisation's
  worst case, so the quantised vector still has norm at most C);
- in SecAgg+: each site scales its difference by r_k = round(w_k / M x Q) / Q (w_k its weight, M the largest
  weight, Q = 2^22), clamps it to +-c (``clipping_range``), quantises it stochastically to an integer in [0, Q]
  (step 2c/Q), masks it modulo 2^32; the server unmasks sum_k z_k and sum_k r_k and returns
  (sum_k z_k x 2c/Q - K c) / sum_k r_k;
- :func:`emulate` does that arithmetic without the masks (which cancel exactly modulo 2^32) for ``simulate``: it
  shows what quantisation costs, and gives no security;
- :class:`SecureSum` is what the coordinator holds afterwards: the weighted mean of the differences, who took
  part and their weights, the quantisation, and the totals of the counts each site sends in the clear (values
  clamped, clipped to the norm bound: :meth:`SiteVector.counts`, summed by :class:`Tally`);
  :meth:`SecureSum.check` is all the checking left to it.

The bound (per coordinate, when no value reached the clamp): stochastic rounding moves each z_k by less than one
step, so the mean differs from sum_k r_k d_k / sum_k r_k by less than K x step / sum_k r_k (:meth:`Arithmetic.bound`).
The weights r_k differ from w_k / M by at most 1 / (2Q).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from fedlora_cli import recipe as recipes, storage
from fedlora_cli.errors import FedloraError

if TYPE_CHECKING:
    from fedlora_cli.federation.common import Global

PROTOCOL = "secagg+"
QUANTIZATION_RANGE = 2**22  # SecAgg+'s default, fixed here: the bound and the overflow rule depend on it
MODULUS_RANGE = 2**32
# The global manifest's record of a securely aggregated round (under "aggregation").
MANIFEST_KEY = "secure_aggregation"


def refuse_in_the_clear(recipe: recipes.Recipe, doing: str) -> None:
    """Under secure aggregation an update reaches the coordinator only through SecAgg+: ``doing`` (training one for
    the by-hand path, sending one in a plain Flower message, aggregating updates) is refused in one line."""
    if recipe.federation.secure_aggregation is not None:
        raise FedloraError(f"the federation's recipe sets federation.secure_aggregation: its rounds are summed by "
                           f"SecAgg+ on Flower (simulate emulates it), never from client updates in the clear; "
                           f"refusing {doing}; nothing written")


@dataclass(frozen=True)
class Arithmetic:
    """SecAgg+'s integer arithmetic for a recipe: clamp to +-``clipping_range``, ``Q`` levels, weights up to
    ``max_weight``."""

    clipping_range: float
    max_weight: float
    quantization_range: int = QUANTIZATION_RANGE

    @classmethod
    def of(cls, recipe: recipes.Recipe) -> Arithmetic:
        s = recipe.federation.secure_aggregation
        if s is None:
            raise FedloraError("the recipe does not set federation.secure_aggregation")
        return cls(s.clipping_range, float(max_weight(recipe)))

    @property
    def step(self) -> float:
        """The quantisation step: 2 x clipping_range / Q."""
        return 2 * self.clipping_range / self.quantization_range

    def ratio(self, weight: int) -> float:
        """r_k: the weight as SecAgg+'s client mod quantises it (round(w / M x Q) / Q)."""
        return round(weight / self.max_weight * self.quantization_range) / self.quantization_range

    def bound(self, weights: Sequence[int]) -> float:
        """Largest per-coordinate error of the unmasked weighted mean against sum r_k d_k / sum r_k."""
        return len(weights) * self.step / sum(self.ratio(w) for w in weights)


def max_weight(recipe: recipes.Recipe) -> int:
    """M, the largest weight a site may send: 1 under equal weights (``uniform``, DP-FedAvg), else the most
    distinct examples a round can train on (local_steps x batch_size; validation refuses other weightings)."""
    f, t = recipe.federation, recipe.training
    if f.weighting == "uniform" or recipe.server_privacy is not None:
        return 1
    return int(t.local_steps) * t.batch_size


def site_weight(recipe: recipes.Recipe, num_examples: int) -> int:
    """The weight a site sends in the clear beside its masked vector."""
    return 1 if max_weight(recipe) == 1 else int(num_examples)


def site_bound(recipe: recipes.Recipe, coordinates: int) -> float | None:
    """The L2 norm a site clips its difference to: DP-FedAvg's C less the quantisation's worst case over
    ``coordinates`` values (so the quantised vector's norm stays at most C, the sensitivity the accountant is
    told), else ``federation.norm_bound``; None for no clip."""
    sp = recipe.server_privacy
    if sp is not None:
        bound = sp.clip_norm - Arithmetic.of(recipe).step * math.sqrt(coordinates)
        if bound <= 0:
            raise FedloraError(
                f"server_privacy.clip_norm {sp.clip_norm:g} is below the quantisation's worst case over "
                f"{coordinates} values ({Arithmetic.of(recipe).step * math.sqrt(coordinates):.3g}); lower "
                "federation.secure_aggregation.clipping_range or raise the clip norm")
        return bound
    return recipe.federation.norm_bound


# The counts a site sends in the clear beside its masked vector and weight (the legacy FitRes's metrics).
CLAMPED, CLIPPED = "clamped", "clipped"


@dataclass
class SiteVector:
    """What one site hands to SecAgg+: its difference from the global (sorted by tensor name), and its weight."""

    names: list[str]
    arrays: list[np.ndarray]  # float64
    weight: int
    clipped: bool = False  # scaled down to the site's bound
    clamped: int = 0  # values SecAgg+'s +-clipping_range would have clamped (clamped here, counted for the site)

    def counts(self, recipe: recipes.Recipe) -> dict[str, int]:
        """What the site tells the coordinator in the clear, beside its weight: how many of its values were
        clamped at +-clipping_range, and (under ``federation.norm_bound``) whether it clipped to the bound. Counts,
        not values, but not private either: the clamped count is how many coordinates have |r_k d_i| > c (the
        update's shape, against c / r_k, which depends on the site's weight); clipped, whether the difference's
        norm exceeded the public norm bound. Under DP-FedAvg nothing:
        the clip is DP-FedAvg's own (who clipped is a statistic of the updates the accountant does not noise), and
        validation keeps clipping_range >= the clip norm, so no value can reach the clamp."""
        if recipe.server_privacy is not None:
            return {}
        counts = {CLAMPED: self.clamped}
        if recipe.federation.norm_bound is not None:
            counts[CLIPPED] = int(self.clipped)
        return counts


def site_vector(g: Global, update: storage.ClientUpdate, client_id: str) -> SiteVector:
    """The site's vector for SecAgg+ from its own client update, which the caller checked in full as the
    coordinator would (:func:`fedlora_cli.federation.server.check_update`); its tensors are read and their
    digests checked again here."""
    from fedlora_cli.storage.mapped import widen

    update_dir = update.path
    if update.manifest.client_id != client_id:
        raise FedloraError(f"client update {update_dir} is client '{update.manifest.client_id}''s, not '{client_id}''s")
    tensors = storage.load_verified(update.tensors_path, update.manifest.tensor_digests, "client update tensors",
                                    framework="numpy")
    reference = g.verified_arrays
    names = sorted(tensors)
    arrays = [widen(tensors[n]).astype(np.float64) - widen(reference[n]).astype(np.float64) for n in names]
    recipe = g.recipe
    bound = site_bound(recipe, sum(a.size for a in arrays))
    norm = math.sqrt(sum(float(np.einsum("i,i->", a.ravel(), a.ravel())) for a in arrays))
    clipped = bound is not None and norm > bound
    if clipped:
        arrays = [a * (bound / norm) for a in arrays]
    arith = Arithmetic.of(recipe)
    weight = site_weight(recipe, update.manifest.num_examples)
    if not 1 <= weight <= arith.max_weight:
        raise FedloraError(f"client update {update_dir} reports {weight} examples, outside 1..{arith.max_weight:g}")
    # SecAgg+ clamps the weighted values to +-c; doing it here keeps the count at the site, which alone may know it.
    limit = arith.clipping_range / arith.ratio(weight)
    clamped = sum(int(np.count_nonzero(np.abs(a) > limit)) for a in arrays)
    if clamped:
        arrays = [np.clip(a, -limit, limit) for a in arrays]
    return SiteVector(names, arrays, weight, clipped, clamped)


def quantize(values: np.ndarray, arith: Arithmetic, rng: np.random.Generator) -> np.ndarray:
    """SecAgg+'s stochastic quantisation of already weighted values: clamp to +-c, map to [0, Q], round up with
    probability equal to the fractional part (unbiased)."""
    c = arith.clipping_range
    scaled = (np.clip(values, -c, c) + c) * (arith.quantization_range / (2 * c))
    low = np.floor(scaled)
    return (low + (rng.random(scaled.shape) < scaled - low)).astype(np.int64)


def emulate(vectors: Mapping[str, SiteVector], arith: Arithmetic, seed: int) -> list[np.ndarray]:
    """The unmasked result SecAgg+ computes from these sites' vectors, without masks (they cancel modulo 2^32):
    weight, quantise, sum the integers modulo 2^32, dequantise, divide by the sum of the weights. No security."""
    rng = np.random.default_rng(seed)
    total: list[np.ndarray] | None = None
    ratio_sum = 0
    for cid in sorted(vectors):
        v = vectors[cid]
        q_ratio = round(v.weight / arith.max_weight * arith.quantization_range)
        ratio_sum += q_ratio
        q = [quantize(a * (q_ratio / arith.quantization_range), arith, rng) for a in v.arrays]
        total = q if total is None else [np.mod(t + x, MODULUS_RANGE) for t, x in zip(total, q)]
    if total is None:
        raise FedloraError("no site vectors to aggregate")
    return unmasked_mean(total, len(vectors), ratio_sum, arith)


def unmasked_mean(total: Sequence[np.ndarray], clients: int, ratio_sum: int, arith: Arithmetic) -> list[np.ndarray]:
    """From the integer sum to the weighted mean, as SecAgg+'s server does after unmasking."""
    step, c = arith.step, arith.clipping_range
    return [(t.astype(np.float64) * step - clients * c) * (arith.quantization_range / ratio_sum) for t in total]


def expected_counts(recipe: recipes.Recipe) -> tuple[str, ...]:
    """The counts a site sends beside its vector (:meth:`SiteVector.counts`): none under DP-FedAvg; the clamped
    count, and the clipped flag under ``federation.norm_bound``."""
    if recipe.server_privacy is not None:
        return ()
    return (CLAMPED, CLIPPED) if recipe.federation.norm_bound is not None else (CLAMPED,)


@dataclass(frozen=True)
class Tally:
    """The sites' counts (:meth:`SiteVector.counts`) summed as they arrive: totals only, nothing per site is kept.
    None: no site sent that count (under DP-FedAvg neither; ``clipped`` only under ``federation.norm_bound``)."""

    clamped: int | None = None  # values clamped at +-clipping_range, over the counted sites
    clipped: int | None = None  # counted sites that clipped their difference to federation.norm_bound
    counted: int = 0  # the sites whose counts the totals cover

    def add(self, counts: Mapping[str, Any], coordinates: int, client_id: str,
            expected: Sequence[str]) -> tuple[Tally, str | None]:
        """This tally plus one site's counts when they are the ``expected`` ones, each an integer in range
        (clamped 0..coordinates, clipped 0 or 1); otherwise this tally unchanged and why, in one line. A bad count
        must not fail a round whose sum SecAgg+ already unmasked: every retry would fail alike."""
        why = _bad_counts(counts, coordinates, expected)
        if why is not None:
            return self, f"client '{client_id}' {why}; its counts are left out of the round's totals"
        if not expected:
            return self, None
        totals = {key: (getattr(self, key) or 0) + counts[key] for key in expected}
        return dataclasses.replace(self, **totals, counted=self.counted + 1), None


def _bad_counts(counts: Mapping[str, Any], coordinates: int, expected: Sequence[str]) -> str | None:
    unknown = sorted(set(counts) - set(expected))
    if unknown:
        return f"sent an unknown count '{unknown[0]}' beside its vector"
    for key in expected:
        value, most = counts.get(key), coordinates if key == CLAMPED else 1
        if value is None:
            return f"sent no {key} count beside its vector"
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= most:
            return f"sent {key} = {value!r} beside its vector, outside 0..{most}"
    return None


@dataclass
class SecureSum:
    """What the coordinator holds after a securely aggregated round, and all it holds."""

    mean: dict[str, np.ndarray]  # sum_k r_k d_k / sum_k r_k, float64, by tensor name
    weights: dict[str, int]  # each participant's weight, sent in the clear (client id -> weight)
    arithmetic: Arithmetic
    emulated: bool = False  # simulate's emulation: no masks, no security
    tally: Tally = Tally()  # the sites' counts, summed

    @property
    def clients(self) -> list[str]:
        return sorted(self.weights)

    @property
    def ratio_sum(self) -> float:
        return sum(self.arithmetic.ratio(w) for w in self.weights.values())

    @classmethod
    def of(cls, names: Sequence[str], arrays: Sequence[np.ndarray], weights: Mapping[str, int], arith: Arithmetic,
           **kw: Any) -> SecureSum:
        if len(arrays) != len(names):
            raise FedloraError(f"the unmasked sum holds {len(arrays)} tensors; the method sends {len(names)}")
        return cls(dict(zip(names, (np.asarray(a, dtype=np.float64) for a in arrays))), dict(weights), arith, **kw)

    def delta_sum(self) -> dict[str, np.ndarray]:
        """sum_k d_k under equal weights (DP-FedAvg): the mean times the number of participants."""
        return {n: m * len(self.weights) for n, m in self.mean.items()}

    def check(self, g: Global, bound: float | None) -> None:
        """The coordinator's checks: shapes, finite values, each weight in 1..M, every value within what K
        clamped values can add up to, and under a site bound B the mean's norm within B (n x B for the sum)."""
        arith = self.arithmetic
        for cid, w in self.weights.items():
            if not isinstance(w, int) or not 1 <= w <= arith.max_weight:
                raise FedloraError(f"client '{cid}' took part with weight {w!r}, outside 1..{arith.max_weight:g}; "
                                   "nothing written")
        expected = {n: shape for n, (_, shape) in g.header.items() if g.plan.sends(n)}
        if set(self.mean) != set(expected):
            raise FedloraError("the unmasked sum does not carry the tensors the method sends; nothing written")
        err = arith.bound(list(self.weights.values()))
        limit = len(self.weights) * arith.clipping_range / self.ratio_sum + err
        for name, m in self.mean.items():
            if tuple(m.shape) != tuple(expected[name]):
                raise FedloraError(f"the unmasked sum's tensor '{name}' is {list(m.shape)}, expected "
                                   f"{list(expected[name])}; nothing written")
            if not np.all(np.isfinite(m)):
                raise FedloraError(f"the unmasked sum's tensor '{name}' holds NaN or Inf; nothing written")
            if np.max(np.abs(m), initial=0.0) > limit:
                raise FedloraError(f"the unmasked sum's tensor '{name}' exceeds what {len(self.weights)} clamped "
                                   "values add up to (a wrong modulus or weight); nothing written")
        if bound is not None:
            d = sum(m.size for m in self.mean.values())
            norm = math.sqrt(sum(float(np.sum(m * m)) for m in self.mean.values()))
            if norm > bound + err * math.sqrt(d):
                raise FedloraError(f"the unmasked mean has norm {norm:.6g}, beyond the sites' bound {bound:g} "
                                   f"({len(self.weights)} x {bound:g} for the sum); nothing written")

    def describe(self) -> dict[str, Any]:
        """What the global manifest records of the round's secure aggregation."""
        arith = self.arithmetic
        return {"protocol": PROTOCOL, "emulated": self.emulated, "clients": self.clients,
                "weights": dict(sorted(self.weights.items())), "quantisation_step": arith.step,
                "clipping_range": arith.clipping_range, "quantization_range": arith.quantization_range,
                "max_weight": arith.max_weight, "error_bound": arith.bound(list(self.weights.values())),
                "clamped_values": self.tally.clamped, "clipped_sites": self.tally.clipped,
                "counted_sites": self.tally.counted}
