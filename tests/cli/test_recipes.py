"""fedlora_cli.cli.recipes: list, show, copy, validate; invalid combinations named in one line."""

from __future__ import annotations

import pytest

from cli.helpers import fails, ok, write_recipe


def test_recipes_commands(tmp_path):
    assert "quickstart" in ok(["recipes", "list"])
    assert "method: ffa" in ok(["recipes", "show", "quickstart"])
    ok(["recipes", "copy", "quickstart", tmp_path / "mine.yaml"])
    assert "ok" in ok(["recipes", "validate", tmp_path / "mine.yaml", "quickstart"])


@pytest.mark.parametrize(
    "method, adapter, federation, extra, needles",
    [
        ("ffa", {}, {"aggregation": "svd"}, {}, ["federation.aggregation", "'svd'", "fedavg"]),
        ("fedsa", {}, {"aggregation": "exact"}, {}, ["federation.aggregation", "'exact'", "fedavg"]),
        ("fedavg", {"kind": "vera"}, {"aggregation": "svd"}, {}, ["federation.aggregation", "vera"]),
        ("fedavg", {"client_ranks": {"client-0": 2}}, {}, {}, ["adapter.client_ranks", "svd"]),
        ("fedavg", {"client_ranks": {"client-0": 9}}, {"aggregation": "svd"}, {}, ["adapter.client_ranks", "adapter.r"]),
        ("fedavg", {"kind": "dora"}, {}, {}, ["adapter.kind", "rslora", "vera"]),
        ("fedavg", {"vera_d_initial": 0.5}, {}, {}, ["adapter.vera_d_initial", "vera"]),
        ("fedavg", {}, {"aggregation": "trimmed-mean"}, {}, ["federation.trim_fraction", "trims no client"]),
        ("fedavg", {}, {"norm_bound_action": "ignore"}, {}, ["federation.norm_bound_action"]),
        ("fedavg", {"kind": "vera"}, {}, {"privacy": {"target_epsilon": 3.0}}, ["privacy", "vera"]),
        ("fedavg", {}, {"aggregation": "median"}, {"server_privacy": {"clip_norm": 1.0, "noise_multiplier": 1.0}},
         ["server_privacy", "mean"]),
    ],
)
def test_invalid_combinations_are_named(tmp_path, tiny_model_dir, reviews_csv, method, adapter, federation, extra, needles):
    path = write_recipe(tmp_path, tiny_model_dir, reviews_csv, method, adapter, federation, extra)
    fails(["recipes", "validate", path], *needles)
    out = tmp_path / "g"
    fails(["init", path, "--out", out], *needles)
    assert not out.exists()
