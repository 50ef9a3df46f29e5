"""Recipes: every shipped one validates; bad keys and combinations are rejected by name."""

from __future__ import annotations

import pytest
import yaml

from fedlora_cli import recipe as recipes
from fedlora_cli.errors import FedloraError
from fedlora_cli.recipe import catalog as recipes_catalog

SHIPPED = recipes_catalog.names()


def test_there_are_shipped_recipes_for_each_method():
    loaded = [recipes.load(recipes_catalog.find(n)) for n in SHIPPED]
    methods = {r.federation.method for r in loaded}
    assert {"quickstart", "fedavg-lora", "ffa-lora", "fedsa-lora"} <= set(SHIPPED)
    assert methods >= {"fedavg", "ffa", "fedsa"}


def test_there_are_shipped_recipes_for_the_adapter_kinds_and_heterogeneous_ranks():
    assert {"fedsa-rslora", "fedsa-vera", "ffa-vera", "fedavg-svd-hetero"} <= set(SHIPPED)
    combos = {(r.federation.method, r.adapter.kind) for r in (recipes.load(recipes_catalog.find(n)) for n in SHIPPED)}
    assert {("fedsa", "rslora"), ("fedsa", "vera"), ("ffa", "vera")} <= combos
    hetero = recipes.load(recipes_catalog.find("fedavg-svd-hetero"))
    assert hetero.federation.aggregation == "svd" and hetero.federation.method == "fedavg"
    assert len({hetero.adapter.rank_for(f"client-{k}") for k in range(hetero.federation.clients)}) > 1


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipe_validates(name):
    r = recipes.load(recipes_catalog.find(name))
    assert r.name
    assert recipes_catalog.summary(recipes_catalog.find(name)), "first line comment describes the recipe"


def base() -> dict:
    return {"model": {"base": "some/model"}}


@pytest.mark.parametrize(
    "patch, key",
    [
        ({"training": {"lrate": 1}}, "training.lrate"),
        ({"federaton": {}}, "federaton"),
        ({"federation": {"method": "fedprox"}}, "federation.method"),
        ({"federation": {"head": "tied"}}, "federation.head"),
        ({"training": {"lr": -1}}, "training.lr"),
        ({"training": {"lr": "fast"}}, "training.lr"),
        ({"training": {"local_steps": 5, "local_epochs": 1}}, "training.local_steps"),
        ({"training": {"local_steps": None}}, "training.local_steps"),
        ({"training": {"optimizer": "adamw", "momentum": 0.9}}, "training.momentum"),
        ({"data": {"strategy": "natural"}}, "data.by"),
        ({"data": {"test_fraction": 1.5}}, "data.test_fraction"),
        ({"adapter": {"r": 0}}, "adapter.r"),
        ({"adapter": {"kind": "dora"}}, "adapter.kind"),
        ({"federation": {"method": "ffa", "aggregation": "svd"}}, "federation.aggregation"),
        ({"federation": {"method": "fedsa", "aggregation": "exact"}}, "federation.aggregation"),
        ({"adapter": {"kind": "vera"}, "federation": {"aggregation": "exact"}}, "federation.aggregation"),
        ({"federation": {"aggregation": "average"}}, "federation.aggregation"),
        ({"adapter": {"client_ranks": {"client-0": 2}}}, "adapter.client_ranks"),
        ({"adapter": {"client_ranks": {"client-0": 0}}, "federation": {"aggregation": "svd"}}, "adapter.client_ranks"),
        ({"adapter": {"client_ranks": {"bad id!": 2}}, "federation": {"aggregation": "svd"}}, "adapter.client_ranks"),
        ({"adapter": {"client_ranks": [2, 4]}}, "adapter.client_ranks"),
        ({"adapter": {"vera_d_initial": 0.3}}, "adapter.vera_d_initial"),
        ({"adapter": {"kind": "vera", "vera_d_initial": 0}}, "adapter.vera_d_initial"),
        ({"federation": {"aggregation": "trimmed-mean", "clients": 3}}, "federation.trim_fraction"),
        ({"federation": {"trim_fraction": 0.5}}, "federation.trim_fraction"),
        ({"federation": {"norm_bound": 0}}, "federation.norm_bound"),
        ({"federation": {"norm_bound_action": "drop"}}, "federation.norm_bound_action"),
        ({"adapter": {"kind": "vera"}, "privacy": {"target_epsilon": 1.0}}, "privacy"),
        ({"model": {"base": "m", "task": "translation"}}, "model.task"),
        ({"federation": {"rounds": True}}, "federation.rounds"),
    ],
)
def test_bad_values_name_the_key(patch, key):
    raw = base()
    for section, values in patch.items():
        raw.setdefault(section, {}).update(values)
    with pytest.raises(FedloraError, match=key.replace(".", r"\.")):
        recipes.from_dict(raw)


def test_model_base_is_required():
    with pytest.raises(FedloraError, match="model"):
        recipes.from_dict({"training": {}})


def test_overrides_are_validated_like_file_values(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(base()))
    r = recipes.load(path, {"training.lr": 0.02, "adapter.target_modules": ["q_proj", "v_proj"]})
    assert r.training.lr == 0.02
    assert r.adapter.target_modules == ["q_proj", "v_proj"]
    with pytest.raises(FedloraError, match="training.lr"):
        recipes.load(path, {"training.lr": 0})
    with pytest.raises(FedloraError, match="nosuch.key"):
        recipes.load(path, {"nosuch.key": 1})


def test_parse_override():
    assert recipes.parse_override("training.lr=0.001") == ("training.lr", 0.001)
    assert recipes.from_dict({**base(), "training": {"lr": "1e-3"}}).training.lr == 1e-3
    assert recipes.parse_override("adapter.target_modules=[q, v]") == ("adapter.target_modules", ["q", "v"])
    with pytest.raises(FedloraError):
        recipes.parse_override("training.lr")
    with pytest.raises(FedloraError):
        recipes.parse_override("lr=1")


def test_digest_changes_with_any_value():
    a = recipes.from_dict(base())
    b = recipes.from_dict({**base(), "training": {"lr": 0.001}})
    assert a.digest() == recipes.from_dict(base()).digest()
    assert a.digest() != b.digest()


def test_invalid_yaml_is_one_error(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: [unclosed\n")
    with pytest.raises(FedloraError, match="not valid YAML"):
        recipes.load(path)


def test_pkg_locations(tmp_path):
    assert recipes.resolve_location("org/model") == "org/model"
    assert recipes.resolve_location("pkg:fedlora_cli/recipe/schema.py").endswith("fedlora_cli/recipe/schema.py")
    with pytest.raises(FedloraError, match="not installed"):
        recipes.resolve_location("pkg:no_such_package_xyz/model")


@pytest.mark.parametrize("kind", ["lora", "rslora", "vera"])
@pytest.mark.parametrize("method", ["fedavg", "ffa", "fedsa"])
@pytest.mark.parametrize("aggregation", ["mean", "svd", "exact", "median", "trimmed-mean"])
def test_the_combinations_that_mean_something_validate(kind, method, aggregation):
    raw = {**base(), "adapter": {"kind": kind}, "federation": {"method": method, "aggregation": aggregation}}
    meaningful = aggregation not in ("svd", "exact") or (method == "fedavg" and kind != "vera")
    if meaningful:
        r = recipes.from_dict(raw)
        assert (r.adapter.kind, r.federation.method, r.federation.aggregation) == (kind, method, aggregation)
    else:
        with pytest.raises(FedloraError, match=r"federation\.aggregation"):
            recipes.from_dict(raw)
