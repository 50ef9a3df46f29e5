"""The aggregation strategies (strategy.py, mean.py, median.py, trimmed.py, svd.py, exact.py, products.py) and their
registry (``STRATEGIES``, ``make_strategy``), each through ``Strategy.aggregate`` on hand-made contributions and
checked against the pure functions of :mod:`fedlora_cli.aggregation.functions` or a sum written out here. The
updates are numpy arrays, as the coordinator hands them over (float32; bfloat16 widened).

On the files a real federation writes, the same strategies are checked in tests/federation/test_server.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from conftest import FakeContribution as TensorContribution

from fedlora_cli import recipe as recipes
from fedlora_cli.adapters.kinds import adapter_kind
from fedlora_cli.aggregation import (
    STRATEGIES, Contributions, Exact, Mean, Median, RoundSpec, Strategy, Svd, TrimmedMean, coordinate_median,
    exact_layer, make_strategy, svd_layer, trimmed_mean,
)
from fedlora_cli.aggregation.strategy import normalised
from fedlora_cli.errors import FedloraError
from fedlora_cli.storage.mapped import narrow, widen

HEAD = "base_model.model.classifier.modules_to_save.default.weight"
LAYERS = ["base_model.model.l0.attention.query", "base_model.model.l1.attention.value"]
D_OUT, D_IN, ALPHA, RANK = 6, 5, 8.0, 4


@dataclass
class FakeContribution(TensorContribution):
    """conftest's hand-made contribution over numpy arrays: read back as a copy."""

    def get(self, name: str) -> np.ndarray:
        self.reads.append(name)
        return self.stored[name].copy()


def close(actual: np.ndarray, expected: np.ndarray, **tolerances) -> None:
    torch.testing.assert_close(torch.from_numpy(np.asarray(actual)), torch.from_numpy(np.asarray(expected)),
                               **tolerances)


def screened(*items: tuple[FakeContribution, bool]) -> Contributions:
    return Contributions(list(items))


def spec_for(names, kind: str = "lora", rank_for=lambda client_id: RANK) -> RoundSpec:
    names = sorted(names)
    return RoundSpec(names, adapter_kind(kind), ALPHA, RANK, rank_for, {n: np.zeros(1, np.float32) for n in names})


def random_tensors(seed: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    return {"w": (torch.randn(3, 4, generator=g) * scale).numpy(), "v": (torch.randn(5, generator=g) * scale).numpy()}


def lora_update(seed: int, rank: int = RANK) -> dict[str, np.ndarray]:
    """A LoRA update of two adapted layers of ``rank`` and a shared head, in float32."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in LAYERS:
        tensors[f"{layer}.lora_A.default.weight"] = torch.randn(rank, D_IN, generator=g)
        tensors[f"{layer}.lora_B.default.weight"] = torch.randn(D_OUT, rank, generator=g)
    tensors[HEAD] = torch.randn(2, 3, generator=g)
    return {name: t.numpy() for name, t in tensors.items()}


def factor_names(layer: str) -> tuple[str, str]:
    return f"{layer}.lora_A.default.weight", f"{layer}.lora_B.default.weight"


# Contributions ---------------------------------------------------------------------------------------------------


def test_contributions_hand_over_accepted_updates_one_at_a_time():
    a, b, c = (FakeContribution(f"c{k}", 1 / 3, random_tensors(k)) for k in range(3))
    contributions = screened((a, True), (b, False), (c, True))
    seen = []
    for contribution in contributions:
        # The update handed over before this one has been let go of.
        seen.append((contribution.client_id, [x.tensors is None for x in (a, c)]))
    assert seen == [("c0", [False, False]), ("c2", [True, False])]
    assert contributions.accepted == [a, c] and contributions.rejected == [b]
    assert c.tensors is None
    assert b.tensors is not None, "a rejected update is never handed to the strategy"


def test_drain_screens_everything_and_normalised_renormalises():
    items = [FakeContribution(f"c{k}", w, random_tensors(k)) for k, w in enumerate((0.1, 0.2, 0.3, 0.4))]
    accepted = screened((items[0], True), (items[1], True), (items[2], False), (items[3], True)).drain()
    assert accepted == [items[0], items[1], items[3]]
    assert normalised(accepted) == pytest.approx([0.1 / 0.7, 0.2 / 0.7, 0.4 / 0.7])


def test_the_interface_aggregates_nothing_itself():
    class Nameless(Strategy):
        name = "nameless"

    with pytest.raises(NotImplementedError):
        Nameless().aggregate(screened(), spec_for([]))
    assert Nameless().describe() == {"strategy": "nameless"}
    assert Nameless.from_recipe(recipes.FederationSection()).__class__ is Nameless


# mean ------------------------------------------------------------------------------------------------------------


def test_mean_is_the_weighted_sum_and_streams():
    weights = [0.2, 0.3, 0.5]
    items = [FakeContribution(f"c{k}", w, random_tensors(k)) for k, w in enumerate(weights)]

    result = Mean().aggregate(screened(*((c, True) for c in items)), spec_for(["v", "w"]))

    for name in ("w", "v"):
        by_hand = sum(w * c.stored[name] for c, w in zip(items, weights))
        close(result.tensors[name], by_hand)
    assert all(c.reads == [] for c in items), "mean streams: it never reads an update back"
    assert result.layers == {} and result.residuals == {}


def test_mean_does_not_renormalise_when_nothing_was_rejected():
    # Weights that do not sum to one: DP-FedAvg's 1/m for two arrivals in a federation of m = 4. Dividing by
    # their sum would shrink the noise's denominator and break the sensitivity bound.
    items = [FakeContribution(f"c{k}", 0.25, random_tensors(k)) for k in range(2)]

    result = Mean().aggregate(screened(*((c, True) for c in items)), spec_for(["v", "w"]))

    for name in ("w", "v"):
        close(result.tensors[name], 0.25 * (items[0].stored[name] + items[1].stored[name]))


def test_mean_renormalises_over_the_accepted_weights_when_the_screen_rejected_some():
    honest = [FakeContribution("c0", 0.2, random_tensors(0)), FakeContribution("c1", 0.3, random_tensors(1))]
    outlier = FakeContribution("mallory", 0.5, random_tensors(2, scale=1e6))

    contributions = screened((honest[0], True), (outlier, False), (honest[1], True))
    result = Mean().aggregate(contributions, spec_for(["v", "w"]))

    for name in ("w", "v"):
        by_hand = (0.2 * honest[0].stored[name] + 0.3 * honest[1].stored[name]) / (0.2 + 0.3)
        close(result.tensors[name], by_hand)
    assert contributions.rejected == [outlier] and outlier.reads == []


def test_mean_keeps_low_precision_values_exactly():
    stored = narrow(np.full(4, 0.5, np.float32), "BF16")  # bfloat16, handed over widened to float32
    t = {"w": widen(stored)}
    a, b, c = (FakeContribution(f"c{k}", 1 / 3, t) for k in range(3))
    result = Mean().aggregate(screened((a, True), (b, False), (c, True)), spec_for(["w"]))
    assert result.tensors["w"].dtype == np.float32
    assert np.array_equal(narrow(result.tensors["w"], "BF16"), stored)


# median and trimmed mean ---------------------------------------------------------------------------------------


def test_median_is_the_coordinate_median_of_the_accepted_updates():
    items = [FakeContribution(f"c{k}", w, random_tensors(k)) for k, w in enumerate((0.7, 0.1, 0.1, 0.1))]
    outlier = FakeContribution("mallory", 0.9, random_tensors(9, scale=1e3))

    result = Median().aggregate(screened(*((c, True) for c in items), (outlier, False)), spec_for(["v", "w"]))

    for name in ("w", "v"):
        expected = coordinate_median([c.stored[name] for c in items])
        assert np.array_equal(result.tensors[name], expected)
        # The weights play no part, and neither does the rejected update.
        assert not np.array_equal(expected, coordinate_median([c.stored[name] for c in [*items, outlier]]))
    assert all(sorted(c.reads) == ["v", "w"] for c in items) and outlier.reads == []


def test_median_of_one_tensor_name_at_a_time_covers_exactly_the_sent_names():
    items = [FakeContribution(f"c{k}", 1 / 3, random_tensors(k)) for k in range(3)]
    result = Median().aggregate(screened(*((c, True) for c in items)), spec_for(["w"]))
    assert set(result.tensors) == {"w"} and all(c.reads == ["w"] for c in items)


def test_trimmed_mean_is_the_trimmed_mean_with_the_count_of_the_accepted_updates():
    # 0.34 trims floor(0.34 x 5) = 1 value at each end of the 5 accepted updates; of all 6 it would trim 2.
    items = [FakeContribution(f"c{k}", 0.1, random_tensors(k)) for k in range(5)]
    outlier = FakeContribution("mallory", 0.5, random_tensors(9, scale=1e3))
    strategy = TrimmedMean(0.34)

    result = strategy.aggregate(screened((outlier, False), *((c, True) for c in items)), spec_for(["v", "w"]))

    for name in ("w", "v"):
        values = [c.stored[name] for c in items]
        assert np.array_equal(result.tensors[name], trimmed_mean(values, 1))
        assert not np.array_equal(result.tensors[name], trimmed_mean(values, 2))
    assert strategy.describe() == {"strategy": "trimmed-mean", "trim_fraction": 0.34}


def test_trimmed_mean_checks_the_count_in_the_terms_of_its_setting():
    strategy = TrimmedMean(0.25)
    strategy.check_count(4, "trim fraction")  # floor(0.25 x 4) = 1: fine
    with pytest.raises(FedloraError, match=r"trim fraction is 0\.25, which trims no client out of 3"):
        strategy.check_count(3, "trim fraction")
    Mean().check_count(1, "anything")  # a mean combines any number of updates
    with pytest.raises(FedloraError, match="drops none"):
        strategy.aggregate(screened(*((FakeContribution(f"c{k}", 0.5, random_tensors(k)), True) for k in range(2))),
                           spec_for(["w"]))


# svd and exact: the products B_k A_k ----------------------------------------------------------------------------


def test_svd_is_svd_layer_per_layer_and_the_weighted_mean_for_the_head():
    ranks = {"c0": 2}  # c0 trains rank 2, the others the global rank 4
    rank_for = lambda client_id: ranks.get(client_id, RANK)  # noqa: E731
    weights = {"c0": 0.1, "c1": 0.2, "c2": 0.3, "c3": 0.4}
    items = {c: FakeContribution(c, w, lora_update(k, rank_for(c))) for k, (c, w) in enumerate(weights.items())}
    accepted = ["c0", "c1", "c3"]  # c2 rejected: the weights renormalise over 0.1 + 0.2 + 0.4
    p = {c: weights[c] / 0.7 for c in accepted}
    spec = spec_for(items["c1"].stored, rank_for=rank_for)

    result = Svd().aggregate(screened(*((items[c], c in accepted) for c in weights)), spec)

    kind = adapter_kind("lora")
    for layer in LAYERS:
        a_name, b_name = factor_names(layer)
        factors = [(items[c].stored[a_name], items[c].stored[b_name], p[c], kind.scale(ALPHA, rank_for(c)))
                   for c in accepted]
        a, b, report = svd_layer(iter(factors), rank=RANK, scale=kind.scale(ALPHA, RANK))
        close(result.tensors[a_name], a, rtol=1e-6, atol=1e-6)
        close(result.tensors[b_name], b, rtol=1e-6, atol=1e-6)
        assert result.layers[layer].truncation_error == pytest.approx(report.truncation_error)
        assert result.layers[layer].mean_error == pytest.approx(report.mean_error)
        assert result.layers[layer].rank == report.rank
    # The head is not a factor: the plain weighted mean over the accepted updates.
    close(result.tensors[HEAD], sum(p[c] * items[c].stored[HEAD] for c in accepted))
    assert set(result.tensors) == set(spec.sent) and set(result.layers) == set(LAYERS)
    assert result.residuals == {}
    assert items["c2"].reads == []


def test_exact_is_exact_layer_per_layer_and_the_weighted_mean_for_the_head():
    weights = {"c0": 0.5, "c1": 0.3, "c2": 0.2}
    items = {c: FakeContribution(c, w, lora_update(10 + k)) for k, (c, w) in enumerate(weights.items())}
    accepted = ["c0", "c2"]
    p = {c: weights[c] / 0.7 for c in accepted}
    spec = spec_for(items["c0"].stored, kind="rslora")  # scale alpha / sqrt(r) = 4
    scale = adapter_kind("rslora").scale(ALPHA, RANK)
    assert scale == 4.0

    result = Exact().aggregate(screened(*((items[c], c in accepted) for c in weights)), spec)

    for layer in LAYERS:
        a_name, b_name = factor_names(layer)
        factors = [(items[c].stored[a_name], items[c].stored[b_name], p[c], scale) for c in accepted]
        a, b, residual, report = exact_layer(iter(factors), scale)
        close(result.tensors[a_name], a)
        close(result.tensors[b_name], b)
        close(result.residuals[layer], residual)
        assert result.layers[layer].mean_error == pytest.approx(report.mean_error)
        # And what exact means: s B A + R is the weighted mean of the clients' s B_k A_k.
        f64 = np.float64
        by_hand = sum(p[c] * scale * (items[c].stored[b_name].astype(f64) @ items[c].stored[a_name].astype(f64))
                      for c in accepted)
        close((scale * (result.tensors[b_name].astype(f64) @ result.tensors[a_name].astype(f64))
               + result.residuals[layer].astype(f64)), by_hand, rtol=1e-5, atol=1e-5)
    close(result.tensors[HEAD], sum(p[c] * items[c].stored[HEAD] for c in accepted))
    assert set(result.tensors) == set(spec.sent) and set(result.residuals) == set(LAYERS)
    assert items["c1"].reads == []


def test_product_strategies_refuse_a_kind_without_factors():
    items = [FakeContribution("c0", 1.0, {"base_model.model.l0.query.vera_lambda_d": np.ones(4, np.float32)})]
    for strategy in (Svd(), Exact()):
        with pytest.raises(FedloraError, match="adapter kind 'vera' has no"):
            strategy.aggregate(screened(*((c, True) for c in items)), spec_for(items[0].stored, kind="vera"))


# the registry ------------------------------------------------------------------------------------------------------


def test_strategies_has_each_name_once():
    assert list(STRATEGIES) == ["mean", "svd", "exact", "median", "trimmed-mean"]
    assert [cls.name for cls in STRATEGIES.values()] == list(STRATEGIES)
    assert len({cls for cls in STRATEGIES.values()}) == len(STRATEGIES)
    assert recipes.AGGREGATIONS == tuple(STRATEGIES)


def test_what_each_strategy_declares_it_needs():
    declared = {name: (cls.needs_factors, cls.mixes_ranks, cls.linear) for name, cls in STRATEGIES.items()}
    assert declared == {
        "mean": (False, False, True),  # the only one DP-FedAvg may wrap
        "svd": (True, True, False),  # the only one that combines clients of different ranks
        "exact": (True, False, False),
        "median": (False, False, False),
        "trimmed-mean": (False, False, False),
    }


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_make_strategy_builds_the_named_class(name):
    strategy = make_strategy(recipes.FederationSection(aggregation=name))
    assert type(strategy) is STRATEGIES[name]
    assert strategy.describe()["strategy"] == name


def test_make_strategy_gives_trimmed_mean_the_recipes_trim_fraction():
    r = recipes.from_dict({"model": {"base": "m"},
                           "federation": {"aggregation": "trimmed-mean", "trim_fraction": 0.4, "clients": 5}})
    strategy = make_strategy(r.federation)
    assert isinstance(strategy, TrimmedMean) and strategy.fraction == 0.4
    assert strategy.describe() == {"strategy": "trimmed-mean", "trim_fraction": 0.4}
    other = make_strategy(recipes.FederationSection(aggregation="trimmed-mean", trim_fraction=0.2))
    assert other.fraction == 0.2
