"""fedlora_cli.federation.server: the coordinator's round on the files a tiny federation writes, against
independent computations: FedAvg's weighted mean and its weights, svd and exact on the products B_k A_k,
median, trimmed mean and the norm bound against a poisoned client; and round_recipe's overrides."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run
from safetensors.torch import load_file
from typer.testing import CliRunner

from fedlora_cli import aggregation, federation, recipe as recipes, storage
from fedlora_cli.adapters.kinds import adapter_kind
from fedlora_cli.adapters.roles import ROLE_A, ROLE_B, role_of
from fedlora_cli.cli import app
from fedlora_cli.errors import FedloraError
from fedlora_cli.federation import sampling

CLIENTS = ["client-0", "client-1", "client-2"]


ALPHA, RANK = 8.0, 4  # conftest's adapter: r = 4, alpha = 8


runner = CliRunner()


def arrays(tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Tensors as the coordinator measures them: numpy arrays."""
    return {name: t.numpy() for name, t in tensors.items()}


def weights_of(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / storage.ADAPTER_WEIGHTS))


def update_tensors(layout, round_: int, client: str) -> dict[str, torch.Tensor]:
    return load_file(str(layout.update(round_, client) / storage.UPDATE_TENSORS))


def sent(layout, round_: int, client: str) -> dict[str, torch.Tensor]:
    return load_file(str(layout.update(round_, client) / storage.UPDATE_TENSORS))


def example_weights(layout, round_: int, clients=CLIENTS) -> list[float]:
    n = [storage.read_update(layout.update(round_, c)).manifest.num_examples for c in clients]
    return [k / sum(n) for k in n]


def products(tensors: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """layer -> scale * B A, in float64."""
    return {layer: scale * (tensors[b].double() @ tensors[a].double())
            for layer, (a, b) in adapter_kind("lora").layers(tensors).items()}


def test_fedavg_aggregate_is_the_weighted_mean(make_recipe, cached_federation):
    layout = cached_federation(make_recipe("fedavg"))
    manifests = [storage.read_update(layout.update(2, c)).manifest for c in CLIENTS]
    n = torch.tensor([m.num_examples for m in manifests], dtype=torch.float64)
    p = n / n.sum()
    updates = [update_tensors(layout, 2, c) for c in CLIENTS]
    result = weights_of(layout.global_checkpoint(2))
    for name in updates[0]:
        expected = sum(p[k] * updates[k][name].double() for k in range(len(CLIENTS)))
        torch.testing.assert_close(result[name].double(), expected, rtol=1e-6, atol=1e-7)
    # Head is shared too, so everything is in the update.
    assert set(updates[0]) == set(result)


@pytest.mark.parametrize("method", ["fedavg", "ffa", "fedsa"])
def test_identical_updates_are_a_fixed_point(method, make_recipe, cached_federation, tmp_path):
    layout = cached_federation(make_recipe(method))
    source = layout.update(1, "client-0")
    copies = []
    for k, n in enumerate((5, 50, 500)):
        copy = tmp_path / f"copy-{k}"
        update = storage.read_update(source)
        m = update.manifest
        m.client_id, m.num_examples, m.shard_examples = f"client-{k}", n, n  # ids of the federation
        storage.write_update(copy, m, load_file(str(source / storage.UPDATE_TENSORS)))
        copies.append(copy)
    out = tmp_path / "agg"
    federation.aggregate_round(layout.global_checkpoint(0), copies, out)
    sent = update_tensors(layout, 1, "client-0")
    got = weights_of(out)
    for name, t in sent.items():
        torch.testing.assert_close(got[name], t, rtol=1e-6, atol=1e-7)


def test_weights_follow_example_counts(make_recipe, cached_federation, tmp_path):
    layout = cached_federation(make_recipe("fedavg"))
    result = federation.aggregate_round(
        layout.global_checkpoint(0), [layout.update(1, c) for c in CLIENTS], tmp_path / "again"
    )
    counts = [storage.read_update(layout.update(1, c)).manifest.num_examples for c in CLIENTS]
    assert [r.weight for r in result.clients] == pytest.approx([c / sum(counts) for c in counts])
    shard = federation.aggregate_round(
        layout.global_checkpoint(0), [layout.update(1, c) for c in CLIENTS], tmp_path / "shard", weighting="shard"
    )
    sizes = [r.shard_examples for r in shard.clients]
    assert [r.weight for r in shard.clients] == pytest.approx([s / sum(sizes) for s in sizes])
    uniform = federation.aggregate_round(
        layout.global_checkpoint(0), [layout.update(1, c) for c in CLIENTS], tmp_path / "uniform", weighting="uniform"
    )
    assert [r.weight for r in uniform.clients] == pytest.approx([1 / 3] * 3)


def test_svd_global_is_the_truncated_weighted_mean_of_the_products(strategy_recipe, cached_federation):
    ranks = {"client-0": 1, "client-1": 2}
    layout = cached_federation(strategy_recipe(client_ranks=ranks, aggregation="svd"))
    p = example_weights(layout, 2)
    target: dict[str, torch.Tensor] = {}
    for client, w in zip(CLIENTS, p):
        for layer, prod in products(sent(layout, 2, client), ALPHA / ranks.get(client, RANK)).items():
            target[layer] = target.get(layer, 0) + w * prod
    got = products(weights_of(layout.global_checkpoint(2)), ALPHA / RANK)
    report = storage.read_global(layout.global_checkpoint(2)).manifest.aggregation
    assert report["strategy"] == "svd" and set(report["layers"]) == set(target)
    for layer, m in target.items():
        s = torch.linalg.svdvals(m)
        best = torch.linalg.vector_norm(s[RANK:]) / torch.linalg.vector_norm(s)
        err = torch.linalg.matrix_norm(got[layer] - m) / torch.linalg.matrix_norm(m)
        assert float(err) == pytest.approx(float(best), rel=1e-4, abs=1e-6)
        assert report["layers"][layer]["truncation_error"] == pytest.approx(float(best), rel=1e-4, abs=1e-6)


def test_svd_of_identical_updates_is_a_fixed_point(strategy_recipe, cached_federation, tmp_path):
    layout = cached_federation(strategy_recipe(aggregation="svd"))
    source = layout.update(1, "client-0")
    copies = []
    for k, n in enumerate((5, 50, 500)):
        m = storage.read_update(source).manifest
        m.client_id, m.num_examples, m.shard_examples = f"client-{k}", n, n  # ids of the federation
        copies.append(storage.write_update(tmp_path / f"copy-{k}", m, sent(layout, 1, "client-0")).path)
    federation.aggregate_round(layout.global_checkpoint(0), copies, tmp_path / "agg")
    want = products(sent(layout, 1, "client-0"), ALPHA / RANK)
    got = products(weights_of(tmp_path / "agg"), ALPHA / RANK)
    for layer in want:
        torch.testing.assert_close(got[layer], want[layer], rtol=1e-5, atol=1e-6)


def test_exact_global_update_is_the_weighted_mean_of_the_products(strategy_recipe, cached_federation, tiny_model_dir):
    layout = cached_federation(strategy_recipe(aggregation="exact"))
    scale = ALPHA / RANK
    corrections = {r: storage.read_global(layout.global_checkpoint(r)).correction() for r in (0, 1, 2)}
    assert corrections[0] == {} and corrections[1] and corrections[2]
    for round_ in (1, 2):
        p = example_weights(layout, round_)
        mean: dict[str, torch.Tensor] = {}
        for client, w in zip(CLIENTS, p):
            for layer, prod in products(sent(layout, round_, client), scale).items():
                mean[layer] = mean.get(layer, 0) + w * prod
        g = products(weights_of(layout.global_checkpoint(round_)), scale)
        for layer, m in mean.items():
            before = corrections[round_ - 1].get(layer, torch.zeros(1)).double()
            # This round's update of the effective weight: the correction added, plus s B A.
            effective = corrections[round_][layer].double() - before + g[layer]
            torch.testing.assert_close(effective, m, rtol=1e-5, atol=1e-6)
        # A and B themselves are FedIT's plain weighted means.
        for name in sent(layout, round_, "client-0"):
            if role_of(name) in (ROLE_A, ROLE_B):
                mean_t = sum(w * sent(layout, round_, c)[name].double() for c, w in zip(CLIENTS, p))
                torch.testing.assert_close(weights_of(layout.global_checkpoint(round_))[name].double(), mean_t)


def test_a_later_mean_round_keeps_the_correction(strategy_recipe, cached_federation, tmp_path):
    layout = cached_federation(strategy_recipe(aggregation="exact"))
    # Retrain round 2 is not needed: re-aggregate the round-2 updates with mean instead of exact.
    result = federation.aggregate_round(layout.global_checkpoint(1), [layout.update(2, c) for c in CLIENTS],
                                        tmp_path / "mean", strategy="mean")
    kept = storage.read_global(tmp_path / "mean").correction()
    parent = storage.read_global(layout.global_checkpoint(1)).correction()
    assert set(kept) == set(parent) and all(torch.equal(kept[n], parent[n]) for n in parent)
    assert result.checkpoint.manifest.digest != storage.read_global(layout.global_checkpoint(2)).manifest.digest


def poisoned_copy(layout, tmp_path: Path, client: str = "client-0", factor: float = 1e4,
                  compromised: str = "client-2") -> Path:
    """A well-formed update (valid digests) whose difference from the global is ``factor`` times client's, sent
    by the ``compromised`` site of the federation (only its clients may send updates)."""
    g0 = weights_of(layout.global_checkpoint(0))
    tensors = {n: g0[n] + (t - g0[n]) * factor for n, t in sent(layout, 1, client).items()}
    m = storage.read_update(layout.update(1, client)).manifest
    m.client_id = compromised
    m.num_examples = m.shard_examples = 10**6  # and it claims a huge share of the data
    m.tensor_digests = federation.digests(tensors)
    return storage.write_update(tmp_path / "mallory", m, tensors).path


@pytest.mark.parametrize(
    "options",
    [["--strategy", "median"], ["--strategy", "trimmed-mean", "--trim-fraction", "0.34"],
     ["--norm-bound", "NORM", "--norm-bound-action", "reject"]],
)
def test_a_poisoned_client_does_not_move_the_robust_aggregate(options, strategy_recipe, cached_federation, tmp_path):
    layout = cached_federation(strategy_recipe("fedsa"))  # A and the head travel
    honest = [sent(layout, 1, c) for c in CLIENTS[:2]]  # client-2's site is compromised
    updates = [layout.update(1, c) for c in CLIENTS[:2]] + [poisoned_copy(layout, tmp_path)]
    if "NORM" in options:
        g0 = weights_of(layout.global_checkpoint(0))
        largest = max(aggregation.update_norm(arrays(h), arrays(g0)) for h in honest)
        options = [str(2 * largest) if o == "NORM" else o for o in options]
    out = tmp_path / "g1"
    result = runner.invoke(app, ["aggregate", str(layout.global_checkpoint(0)), *map(str, updates), "--out", str(out),
                                 *options, "--json"])
    assert result.exit_code == 0, result.output
    got = weights_of(out)
    for name in honest[0]:
        stacked = torch.stack([h[name] for h in honest])
        low, high = stacked.min(dim=0).values, stacked.max(dim=0).values
        assert bool(((got[name] >= low - 1e-7) & (got[name] <= high + 1e-7)).all()), name
    report = json.loads(result.stdout)["aggregation"]
    if "reject" in options:
        assert report["rejected"] == ["client-2"]
    # Without the defence the poisoned client drags the mean far outside.
    plain = federation.aggregate_round(layout.global_checkpoint(0), updates, tmp_path / "plain", strategy="mean")
    name = next(n for n in honest[0] if role_of(n) == ROLE_A)
    assert float((weights_of(plain.checkpoint.path)[name] - honest[0][name]).abs().max()) > 1.0


def test_median_is_the_coordinate_median_of_the_updates(strategy_recipe, cached_federation, tmp_path):
    layout = cached_federation(strategy_recipe("fedavg"))
    federation.aggregate_round(layout.global_checkpoint(0), [layout.update(1, c) for c in CLIENTS], tmp_path / "m",
                               strategy="median")
    got = weights_of(tmp_path / "m")
    for name in sent(layout, 1, "client-0"):
        values = torch.stack([sent(layout, 1, c)[name] for c in CLIENTS])
        torch.testing.assert_close(got[name], values.median(dim=0).values)  # three clients: the middle value


def test_norm_bound_clip_is_the_mean_of_clipped_updates(strategy_recipe, cached_federation, tmp_path):
    layout = cached_federation(strategy_recipe("fedavg"))
    g0 = weights_of(layout.global_checkpoint(0))
    updates = [sent(layout, 1, c) for c in CLIENTS]
    norms = [aggregation.update_norm(arrays(u), arrays(g0)) for u in updates]
    bound = sorted(norms)[1]  # clips the largest update only
    result = federation.aggregate_round(layout.global_checkpoint(0), [layout.update(1, c) for c in CLIENTS],
                                        tmp_path / "c", norm_bound=bound)
    p = example_weights(layout, 1)
    for name in updates[0]:
        by_hand = sum(w * (g0[name] + (u[name] - g0[name]) * min(1.0, bound / n)) for u, w, n in zip(updates, p, norms))
        torch.testing.assert_close(weights_of(tmp_path / "c")[name], by_hand, rtol=1e-5, atol=1e-7)
    assert [r.bound for r in result.clients].count("clipped") == 1
    assert result.checkpoint.manifest.aggregation["clipped"] == [CLIENTS[norms.index(max(norms))]]


def test_aggregate_cli_reports_the_error_of_plain_averaging(strategy_recipe, cached_federation, tmp_path):
    layout = cached_federation(strategy_recipe("fedavg"))
    updates = [str(layout.update(1, c)) for c in CLIENTS]
    table = runner.invoke(app, ["aggregate", str(layout.global_checkpoint(0)), *updates, "--out", str(tmp_path / "t"),
                                "--strategy", "exact"])
    assert table.exit_code == 0, table.output
    assert "error of plain averaging" in table.stdout and "0.attention.self.query" in table.stdout
    result = runner.invoke(app, ["aggregate", str(layout.global_checkpoint(0)), *updates, "--out", str(tmp_path / "j"),
                                 "--strategy", "svd", "--json"])
    assert result.exit_code == 0, result.output
    layers = json.loads(result.stdout)["aggregation"]["layers"]
    assert len(layers) == 4 and all(0 < v["mean_error"] < 10 for v in layers.values())
    # The same numbers an independent computation gives, and they are stored in the global manifest.
    p = example_weights(layout, 1)
    ups = [sent(layout, 1, c) for c in CLIENTS]
    for layer, (a, b) in adapter_kind("lora").layers(ups[0]).items():
        exact = sum(w * (u[b].double() @ u[a].double()) for u, w in zip(ups, p))
        plain = sum(w * u[b].double() for u, w in zip(ups, p)) @ sum(w * u[a].double() for u, w in zip(ups, p))
        error = float(torch.linalg.matrix_norm(plain - exact) / torch.linalg.matrix_norm(exact))
        assert layers[layer]["mean_error"] == pytest.approx(error, rel=1e-4)
    assert storage.read_global(tmp_path / "j").manifest.aggregation["layers"] == layers


# round_recipe: a round's overrides, validated by the recipe's own rules -----------------------------------------


def small_recipe(**federation_keys) -> recipes.Recipe:
    return recipes.from_dict({"model": {"base": "m"}, "federation": {"clients": 3, **federation_keys}})


def test_round_recipe_without_overrides_is_the_recipe():
    recipe = small_recipe()
    assert federation.round_recipe(recipe, {}) == recipe
    assert federation.round_recipe(recipe, {"strategy": None, "norm_bound": None, "server_privacy": None}) == recipe


def test_round_recipe_replaces_the_federation_keys_it_is_given():
    recipe = small_recipe()
    changed = federation.round_recipe(recipe, {"strategy": "median", "weighting": "uniform", "norm_bound": 2.5,
                                               "norm_bound_action": "reject"})
    f = changed.federation
    assert (f.aggregation, f.weighting, f.norm_bound, f.norm_bound_action) == ("median", "uniform", 2.5, "reject")
    assert changed.adapter == recipe.adapter and changed.training == recipe.training
    assert recipe.federation.aggregation == "mean", "the recipe itself is left as it was"


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"strategy": "average"}, r"^aggregation strategy must be one of mean, svd, exact, median, trimmed-mean; got 'average'"),
        ({"weighting": "votes"}, r"^weighting must be one of"),
        ({"trim_fraction": 0.7}, r"^trim fraction must be between 0 and 0.5; got 0.7"),
        ({"norm_bound": -1.0}, r"^norm bound must be > 0"),
        ({"norm_bound_action": "drop"}, r"^norm bound action must be one of clip, reject"),
        ({"strategy": "svd"}, r"^aggregation strategy is 'svd', which combines the products"),
    ],
)
def test_round_recipe_names_the_overridden_option_it_refuses(overrides, message):
    recipe = small_recipe(method="ffa") if overrides.get("strategy") == "svd" else small_recipe()
    with pytest.raises(FedloraError, match=message):
        federation.round_recipe(recipe, overrides)


def test_round_recipe_leaves_the_trim_count_to_the_updates_that_arrive():
    # 0.25 of the 3 planned clients trims none: the recipe refuses it, a round checks the updates that arrived.
    with pytest.raises(FedloraError, match="federation.trim_fraction"):
        small_recipe(aggregation="trimmed-mean")
    changed = federation.round_recipe(small_recipe(), {"strategy": "trimmed-mean"})
    assert changed.federation.aggregation == "trimmed-mean" and changed.federation.trim_fraction == 0.25


def test_round_recipe_refuses_unknown_overrides():
    with pytest.raises(TypeError, match="unknown override 'strategi'"):
        federation.round_recipe(small_recipe(), {"strategi": "median"})


def test_round_recipe_server_privacy_is_validated_in_the_options_terms():
    dp = recipes.ServerPrivacySection(clip_norm=1.0, noise_multiplier=0.5)
    changed = federation.round_recipe(small_recipe(), {"server_privacy": dp})
    assert changed.server_privacy == dp
    with pytest.raises(FedloraError, match=r"^--dp-clip must be > 0"):
        federation.round_recipe(small_recipe(), {"server_privacy": recipes.ServerPrivacySection(0.0, 0.5)})
    with pytest.raises(FedloraError, match=r"^--dp-noise must be >= 0"):
        federation.round_recipe(small_recipe(), {"server_privacy": recipes.ServerPrivacySection(1.0, -1.0)})
    with pytest.raises(FedloraError, match=r"^server privacy \(DP-FedAvg\) needs aggregation strategy 'mean'; got 'median'"):
        federation.round_recipe(small_recipe(), {"server_privacy": dp, "strategy": "median"})


def test_round_recipe_keeps_the_recipes_server_budget():
    recipe = recipes.from_dict({"model": {"base": "m"},
                                "server_privacy": {"clip_norm": 1.0, "noise_multiplier": 5.0, "target_epsilon": 2.0}})
    asked = recipes.ServerPrivacySection(clip_norm=1.0, noise_multiplier=0.3)
    assert federation.round_recipe(recipe, {"server_privacy": asked}).server_privacy.target_epsilon == 2.0
    own = recipes.ServerPrivacySection(clip_norm=1.0, noise_multiplier=0.3, target_epsilon=9.0)
    assert federation.round_recipe(recipe, {"server_privacy": own}).server_privacy.target_epsilon == 9.0
    assert federation.round_recipe(recipe, {}).server_privacy == recipe.server_privacy


def test_aggregate_refuses_a_client_the_round_did_not_ask(scaled, tmp_path):
    recipe = scaled(clients=3)
    layout = run(recipe, tmp_path / "run")
    sampled = recipes.from_dict({**recipe.to_dict(), "federation": {**recipe.to_dict()["federation"],
                                                                   "clients_per_round": 1}})
    g0 = federation.init(sampled, tmp_path / "g0", partition=json.loads((layout.data / "partition.json").read_text()))
    asked = sampling.asked(sampled.federation, sampled.training.seed, 1)
    other = next(c for c in ("client-0", "client-1", "client-2") if c not in asked)
    # train-client refuses to train it (tests/federation/test_rounds.py); an update that claims it is made by hand.
    update = federation.train_client(g0, layout.data / f"{asked[0]}.parquet", tmp_path / "state", tmp_path / "u",
                                     asked[0])
    manifest = json.loads((update.update.path / storage.UPDATE_MANIFEST).read_text())
    (update.update.path / storage.UPDATE_MANIFEST).write_text(json.dumps({**manifest, "client_id": other}))
    out = tmp_path / "g1"
    result = runner.invoke(app, ["aggregate", str(g0.path), str(update.update.path), "--out", str(out)])
    assert result.exit_code == 1 and "did not ask" in result.output and other in result.output
    assert not out.exists()


def test_a_client_outside_the_federation_is_refused_by_aggregate_and_train_client(make_recipe, federation_copy,
                                                                                  partition_dir, tmp_path):
    """Issue 28: with clients: 3 and no client_ids the federation is client-0..client-2, yet fedlora aggregate took
    an update from 'site-x' (Flower already refused such a site)."""
    from cli.helpers import fails

    layout = federation_copy(make_recipe("fedavg"))
    g0 = layout.global_checkpoint(0)
    stranger = tmp_path / "site-x"
    shutil.copytree(layout.update(1, "client-0"), stranger)
    manifest = json.loads((stranger / storage.UPDATE_MANIFEST).read_text())
    (stranger / storage.UPDATE_MANIFEST).write_text(json.dumps({**manifest, "client_id": "site-x"}))
    out = tmp_path / "g1"
    fails(["aggregate", g0, layout.update(1, "client-1"), stranger, "--out", out],
          "from client 'site-x', which is not one of the federation's clients",
          "federation.clients = 3 without client_ids: client-0..client-2")
    assert not out.exists()
    fails(["train-client", g0, "--data", partition_dir / "client-0.parquet", "--state", tmp_path / "state",
           "--client-id", "site-x", "--out", tmp_path / "u"], "refusing to train client 'site-x'")
    assert not (tmp_path / "u").exists() and not (tmp_path / "state").exists()


def test_fewer_updates_than_min_clients_is_one_line_and_writes_nothing(scaled, tmp_path):
    layout = run(scaled(clients=3), tmp_path / "run")
    g0 = layout.global_checkpoint(0)
    raw = json.loads((g0 / storage.GLOBAL_MANIFEST).read_text())
    raw["recipe"]["federation"]["min_clients"] = 3
    strict = tmp_path / "strict-g0"
    storage.write_global(strict, storage.GlobalManifest(**raw), load_file(str(g0 / storage.ADAPTER_WEIGHTS)),
                         json.loads((g0 / storage.ADAPTER_CONFIG).read_text()))
    # The updates name their parent by digest, which the copy keeps: only min_clients differs.
    two = [str(layout.update(1, c)) for c in ("client-0", "client-1")]
    out = tmp_path / "g1"
    result = runner.invoke(app, ["aggregate", str(strict), *two, "--out", str(out)])
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert "fewer than federation.min_clients = 3" in result.output and "Traceback" not in result.output
    assert not out.exists()
    ok = runner.invoke(app, ["aggregate", str(strict), *two, str(layout.update(1, "client-2")), "--out", str(out)])
    assert ok.exit_code == 0, ok.output
