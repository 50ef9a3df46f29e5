"""fedlora_cli.recipe.catalog: every shipped recipe validates; there are recipes for each method and adapter kind."""

from __future__ import annotations

import pytest

from fedlora_cli import recipe as recipes
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


def test_the_flowertune_recipes_have_flowertunes_shape_and_differ_only_in_the_method():
    fedavg, ffa = (recipes.load(recipes_catalog.find(f"flowertune-{m}")) for m in ("fedavg", "ffa"))
    for r in (fedavg, ffa):
        assert (r.model.quantization, r.model.quant_type, r.adapter.r, r.adapter.alpha) == ("4bit", "nf4", 32, 64)
        assert (r.federation.clients, r.federation.clients_per_round, r.data.format) == (20, 2, "alpaca")
        assert r.training.gradient_checkpointing and r.model.task == "causal-lm"
    assert (fedavg.federation.method, ffa.federation.method) == ("fedavg", "ffa")
    same = {**ffa.to_dict(), "name": fedavg.name, "federation": {**ffa.to_dict()["federation"], "method": "fedavg"}}
    assert same == fedavg.to_dict()


def test_every_shipped_encoder_recipe_reads_the_pooling_its_model_declares():
    loaded = [recipes.load(recipes_catalog.find(name)) for name in SHIPPED]
    encoders = [r for r in loaded if r.model.task == recipes.TASK_CLASSIFICATION]
    assert encoders and all(r.model.pooling == "auto" for r in encoders), [r.name for r in encoders]
    assert all(r.model.pooling == "default" for r in loaded if r not in encoders)
