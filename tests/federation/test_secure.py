"""Secure aggregation's arithmetic and the coordinator's side of it: the emulated SecAgg+ sum within its derived
bound, simulate writing no client update, the refusals, and DP-FedAvg on the unmasked sum."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import yaml
from conftest import recipe_dict
from secure_check import assert_global_is_the_weighted_mean

from fedlora_cli import recipe as recipes, storage
from fedlora_cli.federation import rounds, secure, simulate
from fedlora_cli.federation.init import init
from fedlora_cli.federation.server import aggregate_secure
from fedlora_cli.privacy.accounting import server_epsilon
from tests.cli.helpers import fails

SECURE = {"num_shares": 3, "reconstruction_threshold": 2, "clipping_range": 1.0}


def secure_raw(tiny_model_dir, reviews_csv, method="ffa", **federation):
    raw = recipe_dict(tiny_model_dir, reviews_csv, method)
    raw["federation"].update(secure_aggregation=dict(SECURE), **federation)
    return raw


def vector(values, weight):
    return secure.SiteVector(["t"], [np.asarray(values, dtype=np.float64)], weight)


def test_the_emulated_sum_is_the_ratio_weighted_mean_within_k_steps_over_the_ratio_sum():
    # Prepare: three sites, unequal weights, values across the clamp-free range
    arith = secure.Arithmetic(clipping_range=0.5, max_weight=40)
    rng = np.random.default_rng(0)
    vectors = {f"c{i}": vector(rng.uniform(-0.4, 0.4, 10_000), w) for i, w in enumerate((40, 13, 7))}
    # Execute
    (got,) = secure.emulate(vectors, arith, seed=1)
    # Assert
    ratios = {c: arith.ratio(v.weight) for c, v in vectors.items()}
    exact = sum(ratios[c] * v.arrays[0] for c, v in vectors.items()) / sum(ratios.values())
    bound = arith.bound([40, 13, 7])
    assert bound == pytest.approx(3 * (1.0 / 2**22) / (1 + 13 / 40 + 7 / 40), rel=1e-6)
    err = np.abs(got - exact)
    assert err.max() <= bound
    assert err.max() > bound / 10  # the quantisation is really there: not an exact float mean
    assert abs(float(np.mean(got - exact))) < bound / 10  # stochastic rounding is unbiased


def test_values_beyond_the_clipping_range_are_clamped_as_secagg_clamps_them():
    arith = secure.Arithmetic(clipping_range=0.5, max_weight=1)
    (got,) = secure.emulate({"a": vector([2.0, -2.0, 0.25], 1), "b": vector([0.0, 0.0, 0.25], 1)}, arith, seed=0)
    np.testing.assert_allclose(got, [0.25, -0.25, 0.25], atol=arith.bound([1, 1]))


def test_the_integer_sum_is_taken_modulo_2_32_so_1023_sites_come_back_and_1024_would_not():
    # 1023 sites at the top of the range: the integer sum passes 2^31 but stays below 2^32 (the validation's limit)
    arith = secure.Arithmetic(clipping_range=1.0, max_weight=1)
    vectors = {f"c{i:04d}": vector([1.0, -1.0], 1) for i in range(1023)}
    (got,) = secure.emulate(vectors, arith, seed=0)
    np.testing.assert_allclose(got, [1.0, -1.0], atol=arith.bound([1] * 1023))
    # One more site and the top value's sum reaches 2^32, which SecAgg+'s modulus wraps to 0: +c comes back as -c.
    # This is why validation refuses more than 1023 clients a round.
    vectors["c1023"] = vector([1.0, -1.0], 1)
    (wrapped,) = secure.emulate(vectors, arith, seed=0)
    assert wrapped[0] == pytest.approx(-1.0, abs=1e-6) and wrapped[1] == pytest.approx(-1.0, abs=1e-6)


def test_simulate_emulates_secure_aggregation_and_keeps_no_client_update(tmp_path, tiny_model_dir, reviews_csv,
                                                                         monkeypatch):
    # Prepare: keep a copy of each round's staged updates (simulate drops them) to compare against
    kept = {}
    real = rounds.emulated_sum

    def spy(g, updates):
        r = g.manifest.round + 1
        kept[r] = {cid: shutil.copytree(path, tmp_path / "kept" / str(r) / cid) for cid, path in updates.items()}
        return real(g, updates)

    monkeypatch.setattr(rounds, "emulated_sum", spy)
    recipe = recipes.from_dict(secure_raw(tiny_model_dir, reviews_csv))
    warned = []

    class Reporter:
        stage = round_done = done_training = staticmethod(lambda *a: None)
        training = staticmethod(lambda *a: None)
        warn = staticmethod(warned.append)

    # Execute
    simulate.simulate(recipe, tmp_path / "run", Reporter())
    # Assert
    layout = simulate.RunLayout(tmp_path / "run")
    for r in (1, 2):
        assert_global_is_the_weighted_mean(layout.global_checkpoint(r - 1), layout.global_checkpoint(r), kept[r])
        assert storage.read_global(layout.global_checkpoint(r)).manifest.aggregation["secure_aggregation"]["emulated"]
    assert not (layout.root / "updates").exists() and not (layout.root / ".staging").exists()
    assert any("provides no security" in w for w in warned)


@pytest.mark.parametrize(("key", "value", "needle"), [
    ("aggregation", "median", "rules out federation.aggregation 'median'"),
    ("aggregation", "trimmed-mean", "rules out federation.aggregation 'trimmed-mean'"),
    ("aggregation", "svd", "rules out federation.aggregation 'svd'"),
    ("aggregation", "exact", "rules out federation.aggregation 'exact'"),
    ("norm_bound_action", "reject", "rules out federation.norm_bound_action 'reject' (a server-side norm bound)"),
    ("update_encoding", "int8", "rules out federation.update_encoding 'int8'"),
])
def test_what_secure_aggregation_rules_out_is_refused_by_name(key, value, needle, tmp_path, tiny_model_dir,
                                                               reviews_csv):
    raw = secure_raw(tiny_model_dir, reviews_csv, "fedavg", **{key: value})
    if key == "norm_bound_action":
        raw["federation"]["norm_bound"] = 1.0
    if value == "trimmed-mean":
        raw["federation"]["trim_fraction"] = 0.4  # one trimmed each side of 3, so only secure aggregation refuses
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    fails(["simulate", path, "--out", tmp_path / "run"], needle)
    assert not (tmp_path / "run").exists()


def dp_global(tmp_path, tiny_model_dir, reviews_csv, noise=1.0, clip=0.5):
    raw = secure_raw(tiny_model_dir, reviews_csv, weighting="uniform")
    raw["server_privacy"] = {"clip_norm": clip, "noise_multiplier": noise}
    raw["data"]["labels"] = ["neg", "pos"]
    return init(recipes.from_dict(raw), tmp_path / "round-000")


def test_dp_fedavg_on_the_unmasked_sum_adds_sigma_c_over_m_and_spends_what_the_plain_round_spends(
        tmp_path, tiny_model_dir, reviews_csv):
    # Prepare: every site sent a zero difference
    g = dp_global(tmp_path, tiny_model_dir, reviews_csv, noise=1.0, clip=0.5)
    sent = sorted(n for n in g.header if g.plan.sends(n))
    arith = secure.Arithmetic.of(g.recipe)
    zero = secure.SecureSum.of(sent, [np.zeros(g.header[n][1]) for n in sent], {f"client-{i}": 1 for i in range(3)},
                               arith)
    # Execute: two rounds
    g1 = aggregate_secure(g, zero, tmp_path / "round-001", noise_seed=3).checkpoint
    g2 = aggregate_secure(g1, zero, tmp_path / "round-002", noise_seed=4).checkpoint
    # Assert: the noise's standard deviation over every sent coordinate is sigma * C / m
    before, after = g.verified_arrays, g1.verified_arrays
    noise = np.concatenate([(after[n].astype(np.float64) - before[n]).ravel() for n in sent])
    assert noise.size > 500  # the std estimate is within about 3% (1 / sqrt(2 n)); 0.12 is four of those
    assert float(np.std(noise)) == pytest.approx(1.0 * 0.5 / 3, rel=0.12)
    # The same ledger and epsilon as the plain DP-FedAvg rounds: two Gaussian releases at sigma 1
    assert g2.manifest.server_privacy_ledger == [[1.0, 1.0, 1], [1.0, 1.0, 1]]
    row = rounds.round_row(rounds.RunLayout(tmp_path), g2, {}, None, kept_loss=lambda *a: None)
    assert row["server_epsilon"] == server_epsilon([(1.0, 1.0, 1), (1.0, 1.0, 1)], 1e-5)
    assert row["train_loss"] is None and row["clients"] == 3


def test_under_dp_fedavg_a_site_clips_below_c_by_the_quantisations_worst_case(tmp_path, tiny_model_dir, reviews_csv):
    g = dp_global(tmp_path, tiny_model_dir, reviews_csv, clip=0.5)
    d = 10_000
    step = 2 * SECURE["clipping_range"] / 2**22
    assert secure.site_bound(g.recipe, d) == pytest.approx(0.5 - step * math.sqrt(d))


def test_the_coordinator_refuses_a_sum_beyond_what_the_sites_could_send(tmp_path, tiny_model_dir, reviews_csv):
    g = dp_global(tmp_path, tiny_model_dir, reviews_csv, clip=0.5)
    sent = sorted(n for n in g.header if g.plan.sends(n))
    arith = secure.Arithmetic.of(g.recipe)
    big = secure.SecureSum.of(sent, [np.full(g.header[n][1], 0.1) for n in sent], {"client-0": 1, "client-1": 1},
                              arith)
    with pytest.raises(Exception, match=r"the unmasked mean has norm .* beyond the sites' bound .*; nothing written"):
        aggregate_secure(g, big, tmp_path / "round-001")
    bad_weight = secure.SecureSum.of(sent, [np.zeros(g.header[n][1]) for n in sent], {"client-0": 7, "client-1": 1},
                                     arith)
    with pytest.raises(Exception, match=r"client 'client-0' took part with weight 7, outside 1..1"):
        aggregate_secure(g, bad_weight, tmp_path / "round-001")
    assert not (tmp_path / "round-001").exists()


def test_aggregate_refuses_to_sum_a_secure_federations_updates_in_the_clear(tmp_path, tiny_model_dir, reviews_csv):
    g = dp_global(tmp_path, tiny_model_dir, reviews_csv)
    fails(["aggregate", g.path, g.path, "--out", tmp_path / "round-001"], "sets federation.secure_aggregation",
          "never from client updates in the clear")
    assert not (tmp_path / "round-001").exists()


def test_train_client_refuses_to_make_a_secure_federations_update_for_the_clear(tmp_path, tiny_model_dir,
                                                                                  reviews_csv):
    # A by-hand update would travel in the clear and, under DP-SGD, spend budget for a round nobody may aggregate.
    g = dp_global(tmp_path, tiny_model_dir, reviews_csv)
    fails(["train-client", g.path, "--data", reviews_csv, "--state", tmp_path / "state", "--out",
           tmp_path / "update", "--client-id", "client-0"], "sets federation.secure_aggregation",
          "refusing to train an update for the by-hand path")
    assert not (tmp_path / "update").exists() and not (tmp_path / "state").exists()


def test_each_site_clips_its_difference_to_the_norm_bound_before_the_sum(tmp_path, tiny_model_dir, reviews_csv,
                                                                         monkeypatch):
    # Prepare: a bound far below what 3 steps of AdamW move B (and the head) by
    bound = 1e-3
    recipe = recipes.from_dict(secure_raw(tiny_model_dir, reviews_csv, norm_bound=bound, rounds=1))
    norms = []
    real = secure.site_vector

    def spy(g, update, client_id):
        v = real(g, update, client_id)
        raw = storage.load_verified(update.tensors_path, update.manifest.tensor_digests, "u", framework="numpy")
        ref = g.verified_arrays
        norms.append((math.sqrt(sum(float(np.sum((raw[n].astype(np.float64) - ref[n]) ** 2)) for n in raw)),
                      math.sqrt(sum(float(np.sum(a * a)) for a in v.arrays)), v.clipped))
        return v

    monkeypatch.setattr(secure, "site_vector", spy)
    # Execute
    simulate.simulate(recipe, tmp_path / "run", _Quiet())
    # Assert: every site moved further than the bound, sent exactly the bound, and the mean stays within it
    assert len(norms) == 3 and all(raw > 10 * bound and sent == pytest.approx(bound) and clipped
                                   for raw, sent, clipped in norms)
    layout = simulate.RunLayout(tmp_path / "run")
    g0, g1 = storage.read_global(layout.global_checkpoint(0)), storage.read_global(layout.global_checkpoint(1))
    t0 = storage.load_verified(g0.path / storage.ADAPTER_WEIGHTS, g0.manifest.tensor_digests, "g0", framework="numpy")
    t1 = storage.load_verified(g1.path / storage.ADAPTER_WEIGHTS, g1.manifest.tensor_digests, "g1", framework="numpy")
    moved = math.sqrt(sum(float(np.sum((t1[n].astype(np.float64) - t0[n]) ** 2)) for n in t0))
    assert 0 < moved <= bound * (1 + 1e-3)


class _Quiet:
    stage = warn = round_done = done_training = staticmethod(lambda *a: None)
    training = staticmethod(lambda *a: None)


def test_a_secure_round_whose_poisson_sample_is_short_is_skipped_not_refused(tmp_path, tiny_model_dir, reviews_csv):
    # Prepare: 10 clients, 1 expected a round: round 1's sample (fixed by the seed) is short of min_clients
    from fedlora_cli.federation.sampling import asked, needed
    from fedlora_cli.federation.server import SKIPPED, aggregate_round

    raw = secure_raw(tiny_model_dir, reviews_csv, weighting="uniform", clients=10, clients_per_round=1,
                     sampling="poisson")
    raw["data"]["labels"] = ["neg", "pos"]
    g0 = init(recipes.from_dict(raw), tmp_path / "round-000")
    f = g0.recipe.federation
    assert needed(f, len(asked(f, g0.recipe.training.seed, 1)), False) is None
    # Execute
    g1 = aggregate_round(g0, [], tmp_path / "round-001").checkpoint
    # Assert: carried forward, recorded as skipped
    assert g1.manifest.aggregation["strategy"] == SKIPPED and g1.manifest.round == 1


def test_simulate_reports_the_values_its_emulation_clamped_as_the_flower_coordinator_does(tmp_path, tiny_model_dir,
                                                                                         reviews_csv, monkeypatch):
    # Prepare: a clipping range below what the sites' differences reach; keep each round's staged updates
    from secure_check import site_counts

    kept = {}
    real = rounds.emulated_sum

    def spy(g, updates):
        kept.update({cid: shutil.copytree(path, tmp_path / "kept" / cid) for cid, path in updates.items()})
        return real(g, updates)

    monkeypatch.setattr(rounds, "emulated_sum", spy)
    raw = secure_raw(tiny_model_dir, reviews_csv, rounds=1, norm_bound=0.5)
    raw["federation"]["secure_aggregation"]["clipping_range"] = 0.005
    warned, rows = [], []

    class Reporter(_Quiet):
        warn = staticmethod(warned.append)
        round_done = staticmethod(rows.append)

    # Execute
    simulate.simulate(recipes.from_dict(raw), tmp_path / "run", Reporter())
    # Assert: the same totals, in the manifest and the row, and the same one-line warning
    layout = simulate.RunLayout(tmp_path / "run")
    counts = [site_counts(layout.global_checkpoint(0), path) for path in kept.values()]
    clamped, clipped = sum(n for n, _ in counts), sum(c for _, c in counts)
    assert clamped > 0 and clipped > 0
    record = storage.read_global(layout.global_checkpoint(1)).manifest.aggregation["secure_aggregation"]
    assert record["emulated"] and (record["clamped_values"], record["clipped_sites"]) == (clamped, clipped)
    assert (rows[0]["clamped_values"], rows[0]["clipped_sites"]) == (clamped, clipped)
    assert [w for w in warned if "were clamped" in w] == [rounds.clamped_warning(1, clamped, 0.005)]


def test_under_dp_fedavg_no_count_leaves_a_site_and_the_clipping_range_must_cover_the_clip_norm(
        tmp_path, tiny_model_dir, reviews_csv):
    # A site's counts under DP-FedAvg: none (who clipped is a statistic of the updates the accountant does not noise)
    g = dp_global(tmp_path, tiny_model_dir, reviews_csv, clip=0.5)
    assert secure.SiteVector(["t"], [np.zeros(3)], 1, clipped=True, clamped=0).counts(g.recipe) == {}
    # ... and so no value may reach the clamp unseen: clipping_range below the clip norm is refused
    raw = secure_raw(tiny_model_dir, reviews_csv, weighting="uniform")
    raw["server_privacy"] = {"clip_norm": 2.0, "noise_multiplier": 1.0}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    fails(["simulate", path, "--out", tmp_path / "run"],
          "'federation.secure_aggregation.clipping_range' must be at least server_privacy.clip_norm (2)")
    assert not (tmp_path / "run").exists()


def test_a_site_without_dp_fedavg_counts_what_it_clamped_and_whether_it_clipped_to_the_norm_bound(tiny_model_dir,
                                                                                                  reviews_csv):
    v = secure.SiteVector(["t"], [np.zeros(3)], 1, clipped=True, clamped=4)
    plain = recipes.from_dict(secure_raw(tiny_model_dir, reviews_csv))
    bounded = recipes.from_dict(secure_raw(tiny_model_dir, reviews_csv, norm_bound=1.0))
    assert v.counts(plain) == {"clamped": 4}  # no bound: nothing to say about clipping
    assert v.counts(bounded) == {"clamped": 4, "clipped": 1}


def test_any_strategy_that_is_not_linear_is_refused_by_its_own_name_and_any_linear_one_runs(
        tiny_model_dir, reviews_csv, monkeypatch):
    # Prepare: two strategies fedlora does not ship, one linear and one not, registered under new names
    from fedlora_cli import aggregation
    from fedlora_cli.errors import FedloraError
    from fedlora_cli.recipe import validation

    class Sketchy(aggregation.Strategy):
        name = "sketchy-median"
        needs_each = "each update's sketch"

    class Scaled(aggregation.Mean):
        name = "scaled-mean"

    for cls in (Sketchy, Scaled):
        monkeypatch.setitem(aggregation.STRATEGIES, cls.name, cls)
    monkeypatch.setattr(validation, "AGGREGATIONS", (*validation.AGGREGATIONS, Sketchy.name, Scaled.name))
    # Execute / Assert
    with pytest.raises(FedloraError, match=r"rules out federation.aggregation 'sketchy-median': it is not linear in "
                                           r"the updates \(it needs each update's sketch\)") as caught:
        recipes.from_dict(secure_raw(tiny_model_dir, reviews_csv, "fedavg", aggregation="sketchy-median"))
    assert "use 'mean' or 'scaled-mean'" in str(caught.value) and "\n" not in str(caught.value)
    assert recipes.from_dict(secure_raw(tiny_model_dir, reviews_csv, "fedavg", aggregation="scaled-mean"))


def test_by_hand_a_secure_round_whose_sample_secagg_cannot_sum_is_skipped_and_sample_says_why(
        tmp_path, tiny_model_dir, reviews_csv, partition_dir):
    # Prepare: round 1's seeded Poisson sample is one site, below reconstruction_threshold = 2
    from cli.helpers import ok
    from flower.test_secure import poisson_recipe
    from typer.testing import CliRunner

    from fedlora_cli.cli import app

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(poisson_recipe(tiny_model_dir, reviews_csv)))
    ok(["init", path, "--data", partition_dir, "--out", tmp_path / "g0"])
    # Execute / Assert: fedlora sample says the round is skipped and why; aggregate carries the global forward
    sample = json.loads(ok(["sample", tmp_path / "g0", "--json"]))
    assert len(sample["asked"]) == 1 and sample["round_is"] == "skipped"
    said = " ".join(CliRunner().invoke(app, ["sample", str(tmp_path / "g0")]).output.split())
    assert "fewer than federation.secure_aggregation.reconstruction_threshold = 2 (SecAgg+ sums no fewer" in said
    ok(["aggregate", tmp_path / "g0", "--out", tmp_path / "g1"])
    g1 = storage.read_global(tmp_path / "g1").manifest
    # the recipe's min_clients (1) under its name, the minimum the round applied (the threshold) beside it
    assert g1.aggregation == {"strategy": "skipped", "asked": 1, "min_clients": 1, "fewest": 2}


def test_dp_fedavg_under_secure_aggregation_with_a_poisson_sample_is_refused_in_one_line(
        tmp_path, tiny_model_dir, reviews_csv, partition_dir):
    # A Poisson sample below reconstruction_threshold cannot be summed by SecAgg+; releasing noise alone for it
    # would let one client move the release by up to t x C / m, beyond the C / m the ledger counts
    raw = secure_raw(tiny_model_dir, reviews_csv, weighting="uniform", clients_per_round=1, sampling="poisson")
    raw["server_privacy"] = {"clip_norm": 0.5, "noise_multiplier": 1.0}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    needles = ("(DP-FedAvg) with federation.secure_aggregation rules out federation.sampling 'poisson'",
               "up to federation.secure_aggregation.reconstruction_threshold x C / m",
               "ask every client each round")
    fails(["init", path, "--data", partition_dir, "--out", tmp_path / "g0"], *needles)
    fails(["simulate", path, "--out", tmp_path / "run"], *needles)
    assert not (tmp_path / "g0").exists() and not (tmp_path / "run").exists()
    # ... and with every client asked each round it runs as before
    del raw["federation"]["clients_per_round"], raw["federation"]["sampling"]
    assert recipes.from_dict(raw).server_privacy is not None


@pytest.mark.parametrize("federation, key, got", [
    ({"clients_per_round": 1}, "federation.clients_per_round", "got 1"),
    ({"clients": 1, "min_clients": 1}, "federation.clients", "got 1"),
], ids=["fixed-sample", "population"])
def test_a_fixed_sample_or_population_below_the_reconstruction_threshold_is_refused(
        federation, key, got, tmp_path, tiny_model_dir, reviews_csv):
    # Before: simulate exited 0 with every round skipped, nothing trained
    raw = secure_raw(tiny_model_dir, reviews_csv, weighting="uniform", rounds=2)
    raw["federation"].update(federation)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    fails(["simulate", path, "--out", tmp_path / "run"],
          f"'{key}' must be at least federation.secure_aggregation.reconstruction_threshold (2) under secure "
          "aggregation: SecAgg+ sums no fewer sites", got)
    assert not (tmp_path / "run").exists()
