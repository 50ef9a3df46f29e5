"""fedlora_cli.recipe.validation: bad keys and combinations are rejected by name; overridden keys are named as the
user set them; planned_clients=False leaves the client count to the round."""

from __future__ import annotations

import dataclasses
import re

import pytest
import yaml
from conftest import causal_recipe_dict, recipe_dict

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
        ({"model": {"base": "m", "pooling": "median"}}, "model.pooling"),
        ({"data": {"format": "messages"}}, "data.format"),  # sequence-classification reads text and labels
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
        ({"model": {"pooling": "mean"}}, "model.pooling"),
        ({"data": {"format": "sharegpt"}}, "data.format"),
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
     ({}, "privacy.target_epsilon"), ({"noise_multiplier": 1.0, "accountant": "gdp"}, "privacy.accountant"),
     ({"target_epsilon": 1.0, "calibration": "site"}, "privacy.calibration"),
     ({"noise_multiplier": 1.0, "calibration": "client"}, "privacy.calibration"),
     ({"target_epsilon": 1.0, "noise_multiplier": 1.0, "calibration": "client"}, "privacy.noise_multiplier")],
)
def test_bad_privacy_settings_name_the_key(section, key):
    raw = {"model": {"base": "m"}, "privacy": section}
    with pytest.raises(Exception, match=key.replace(".", r"\.")):
        recipes.from_dict(raw)


# labels: a message names the option the user set ----------------------------------------------------------------


def with_federation(**keys) -> recipes.Recipe:
    """A valid recipe whose federation section is then changed without validation (as an override is)."""
    r = recipes.from_dict({**base(), "federation": {"clients": 3}})
    return dataclasses.replace(r, federation=dataclasses.replace(r.federation, **keys))


def test_labels_name_the_option_in_the_message():
    bad = with_federation(aggregation="average")
    with pytest.raises(FedloraError, match=r"^recipe key 'federation\.aggregation' must be one of mean, svd"):
        recipes.validate(bad)
    with pytest.raises(FedloraError) as refused:
        recipes.validate(bad, {"federation.aggregation": "aggregation strategy"})
    assert str(refused.value) == (
        "aggregation strategy must be one of mean, svd, exact, median, trimmed-mean; got 'average'"
    )


def test_labels_name_the_option_in_combination_rules_too():
    ffa_svd = with_federation(aggregation="svd", method="ffa")
    with pytest.raises(FedloraError, match=r"^--strategy is 'svd', which combines the products B_k A_k"):
        recipes.validate(ffa_svd, {"federation.aggregation": "--strategy"})
    hetero = recipes.from_dict({**base(), "adapter": {"client_ranks": {"client-0": 2}}, "federation": {"aggregation": "svd"}})
    mean = dataclasses.replace(hetero, federation=dataclasses.replace(hetero.federation, aggregation="mean"))
    with pytest.raises(FedloraError, match=r"^recipe key 'adapter\.client_ranks' needs --strategy 'svd'"):
        recipes.validate(mean, {"federation.aggregation": "--strategy"})


def test_a_label_names_only_its_own_key():
    # Labelling the strategy does not rename the message about another key.
    with pytest.raises(FedloraError, match=r"^recipe key 'federation\.norm_bound' must be > 0"):
        recipes.validate(with_federation(norm_bound=-1.0), {"federation.aggregation": "aggregation strategy"})


def test_the_trim_count_rule_uses_the_planned_clients_unless_told_not_to():
    trimmed = with_federation(aggregation="trimmed-mean", trim_fraction=0.25)  # floor(0.25 x 3) = 0: trims none
    with pytest.raises(FedloraError, match=r"^recipe key 'federation\.trim_fraction' is 0\.25, which trims no client out of 3"):
        recipes.validate(trimmed)
    with pytest.raises(FedloraError, match=r"^trim fraction is 0\.25, which trims no client out of 3"):
        recipes.validate(trimmed, {"federation.trim_fraction": "trim fraction"})
    # A round checks the count against the updates that arrived instead: the recipe passes as it is.
    assert recipes.validate(trimmed, planned_clients=False) is trimmed
    # ... but every other rule still holds.
    with pytest.raises(FedloraError, match=r"federation\.trim_fraction' must be between 0 and 0\.5"):
        recipes.validate(with_federation(aggregation="trimmed-mean", trim_fraction=0.6), planned_clients=False)


def test_validate_returns_the_recipe_unchanged():
    r = recipes.from_dict(base())
    assert recipes.validate(r) is r


@pytest.mark.parametrize(
    "federation_keys, extra, needle",
    [
        ({"clients_per_round": 4}, {}, "federation.clients_per_round"),
        ({"sampling": "poisson"}, {}, "needs federation.clients_per_round"),
        ({"clients_per_round": 2, "min_clients": 3}, {}, "federation.min_clients"),
        ({"clients_per_round": 2}, {"server_privacy": {"clip_norm": 1.0, "noise_multiplier": 1.0}}, "'poisson'"),
        ({"server_optimizer": "fedadam", "aggregation": "svd"}, {}, "federation.server_optimizer"),
        ({"client_ids": ["a", "a", "b"]}, {}, "must not repeat"),
    ],
)
def test_participation_settings_are_validated_by_key(tiny_model_dir, reviews_csv, federation_keys, extra, needle):
    raw = recipe_dict(tiny_model_dir, reviews_csv)
    raw["federation"].update(federation_keys)
    raw.update(extra)
    with pytest.raises(FedloraError, match=needle):
        recipes.from_dict(raw)


def test_tracking_names_known_trackers_once():
    with pytest.raises(FedloraError, match="tracking.report_to' must be one of tensorboard, mlflow, wandb; got 'tb'"):
        recipes.from_dict({**base(), "tracking": {"report_to": ["tb"]}})
    with pytest.raises(FedloraError, match="tracking.report_to' must not name a tracker twice"):
        recipes.from_dict({**base(), "tracking": {"report_to": "mlflow,mlflow"}})


@pytest.mark.parametrize(
    "patch, needle",
    [
        ({"training": {"logit_adjustment": -0.5}}, "recipe key 'training.logit_adjustment' must be >= 0"),
        ({"training": {"logit_adjustment": float("inf")}}, "'training.logit_adjustment' must be a finite number"),
        ({"training": {"logit_adjustment": float("nan")}}, "'training.logit_adjustment' must be a finite number"),
        ({"model": {"base": "m", "task": "causal-lm"}, "training": {"logit_adjustment": 1.0}},
         "'training.logit_adjustment' applies only to model.task 'sequence-classification'"),
        ({"training": {"logit_adjustment": 1.0}, "privacy": {"target_epsilon": 3.0}},
         "'training.logit_adjustment' must be 0 under privacy: its label prior is computed from all of the client's "
         "labels"),
    ],
)
def test_a_logit_adjustment_that_cannot_be_trained_is_refused_in_one_line(patch, needle, tmp_path):
    from cli.helpers import fails

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({**base(), **patch}))
    with pytest.raises(FedloraError, match=re.escape(needle)):
        recipes.load(path)
    fails(["recipes", "validate", path], needle)
