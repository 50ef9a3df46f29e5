"""fedlora_cli.recipe.validation: bad keys and combinations are rejected by name; overridden keys are named as the
user set them; planned_clients=False leaves the client count to the round."""

from __future__ import annotations

import pytest
from conftest import causal_recipe_dict

from fedlora_cli import recipe as recipes
from fedlora_cli.errors import FedloraError


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


@pytest.mark.parametrize(
    "patch, key",
    [
        ({"federation": {"head": "shared"}}, "federation.head"),
        ({"model": {"num_labels": 3}}, "model.num_labels"),
        ({"data": {"labels": ["a", "b"]}}, "data.labels"),
        ({"data": {"by": None}}, "data.by"),
        ({"evaluation": {"answer": "regex"}}, "evaluation.answer"),
        ({"evaluation": {"max_new_tokens": 0}}, "evaluation.max_new_tokens"),
        ({"data": {"strategy": "size", "sizes": [1, 2]}}, "data.sizes"),
        ({"data": {"response_column": "question"}}, "data.response_column"),
    ],
)
def test_causal_recipe_errors_name_the_key(patch, key, tiny_causal_dir, math_jsonl):
    raw = causal_recipe_dict(tiny_causal_dir, math_jsonl)
    for section, values in patch.items():
        raw[section] = {**raw[section], **values}
    with pytest.raises(FedloraError, match=f"'{key}'"):
        recipes.from_dict(raw)


@pytest.mark.parametrize(
    "section, key",
    [({"target_epsilon": -1.0}, "privacy.target_epsilon"), ({"target_epsilon": 1.0, "delta": 1.5}, "privacy.delta"),
     ({}, "privacy.target_epsilon"), ({"noise_multiplier": 1.0, "accountant": "gdp"}, "privacy.accountant")],
)
def test_bad_privacy_settings_name_the_key(section, key):
    raw = {"model": {"base": "m"}, "privacy": section}
    with pytest.raises(Exception, match=key.replace(".", r"\.")):
        recipes.from_dict(raw)
