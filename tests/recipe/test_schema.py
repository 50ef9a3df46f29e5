"""fedlora_cli.recipe.schema: the recipe's identity (its digest), which the trackers and the site settings are not
part of; the choice lists, plain data checked against the runtime registries; a schema that imports no runtime code."""

from __future__ import annotations

import ast
import inspect

import pytest

from fedlora_cli import adapters, aggregation, recipe as recipes, tracking
from fedlora_cli.aggregation import norm_bound
from fedlora_cli.data import formats
from fedlora_cli.recipe import catalog, schema, site_settings


def base() -> dict:
    return {"model": {"base": "some/model"}}


def test_digest_changes_with_any_value():
    a = recipes.from_dict(base())
    b = recipes.from_dict({**base(), "training": {"lr": 0.001}})
    assert a.digest() == recipes.from_dict(base()).digest()
    assert a.digest() != b.digest()


def test_a_data_format_changes_the_digest_and_its_defaults_leave_the_digests_as_they_were():
    causal = {"model": {"base": "some/model", "task": "causal-lm"}}
    named = recipes.from_dict({**causal, "data": {"format": "messages"}})
    assert named.digest() != recipes.from_dict(causal).digest()
    default = recipes.from_dict(causal).to_dict()
    assert default["data"]["format"] == "auto" and default["data"]["messages_column"] == "messages"


def test_logit_adjustment_at_its_default_leaves_the_digest_as_it_was_and_any_other_value_changes_it():
    old = {"name": "old", "model": {"base": "some/model"}, "training": {"lr": 0.001}}
    zero = recipes.from_dict({**old, "training": {"lr": 0.001, "logit_adjustment": 0}})
    adjusted = recipes.from_dict({**old, "training": {"lr": 0.001, "logit_adjustment": 1.0}})
    # The digest pinned before the key existed (see below), with and without the key at its default.
    assert recipes.from_dict(old).digest() == zero.digest() == OLD_SITE_RECIPE_DIGEST
    assert adjusted.digest() != zero.digest()


def test_the_federations_noise_calibration_leaves_a_dp_recipes_digest_as_it_was_and_per_client_changes_it():
    dp = {"name": "dp", "model": {"base": "some/model"}, "privacy": {"target_epsilon": 3.0}}
    shared = recipes.from_dict({**dp, "privacy": {"target_epsilon": 3.0, "calibration": "federation"}})
    own = recipes.from_dict({**dp, "privacy": {"target_epsilon": 3.0, "calibration": "client"}})
    # Pinned before privacy.calibration existed (2026-12-07).
    assert recipes.from_dict(dp).digest() == shared.digest() == (
        "45afcbd5633edfa69393163a4d07f50a65b9364218662487100034e7f688c0cd")
    assert own.digest() != shared.digest()


def test_the_tracking_section_lists_the_trackers_and_stays_out_of_the_digest():
    assert recipes.TRACKERS == ("tensorboard", "mlflow", "wandb")
    tracked = recipes.from_dict({**base(), "tracking": {"report_to": "tensorboard,wandb"}})
    assert tracked.tracking.report_to == ["tensorboard", "wandb"] and recipes.from_dict(base()).tracking is None
    # Each site may watch the federation with its own trackers: the checkpoints' recipe digest ignores them.
    assert tracked.digest() == recipes.from_dict(base()).digest()


@pytest.mark.parametrize(
    ("choices", "registry"),
    [
        (recipes.METHOD_NAMES, adapters.METHODS),
        (recipes.HEAD_POLICY_NAMES, adapters.HEAD_POLICIES),
        (recipes.ADAPTER_KIND_NAMES, adapters.ADAPTER_KINDS),
        (recipes.AGGREGATIONS, aggregation.STRATEGIES),
        (recipes.NORM_BOUND_ACTIONS, norm_bound.ACTIONS),
        (recipes.SERVER_OPTIMIZER_NAMES[1:], aggregation.SERVER_OPTIMIZERS),
        (recipes.TRACKERS, tracking.BACKENDS),
        (recipes.DATA_FORMATS[1:], formats.FORMATS),  # 'auto' picks one of them
    ],
)
def test_each_choice_list_names_its_registry_in_order(choices, registry):
    # The schema lists the choices as plain data; the runtime objects must be exactly those, in the same order
    # (the order of the "must be one of" messages).
    assert choices == tuple(registry)


def test_server_optimizer_none_is_a_choice_of_the_recipe_not_an_optimiser():
    assert recipes.SERVER_OPTIMIZER_NAMES[0] == "none" and "none" not in aggregation.SERVER_OPTIMIZERS


def test_a_choice_list_does_not_share_a_name_with_a_registry():
    registries = {name for module in (adapters, aggregation, tracking) for name in dir(module) if name.isupper()}
    choice_lists = {name for name in dir(schema) if name.isupper() and isinstance(getattr(schema, name), tuple)}
    assert choice_lists and not choice_lists & registries, choice_lists & registries


@pytest.mark.parametrize("module", [schema, site_settings])
def test_the_schema_imports_no_runtime_package(module):
    tree = ast.parse(inspect.getsource(module))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    ours = {name for name in imported if name and name.startswith("fedlora_cli")}
    assert ours <= {"fedlora_cli.recipe.site_settings"}, ours


# Digests pinned so that no refactoring changes them unnoticed: a run folder of an existing recipe must resume. They
# last changed with issue 29, on purpose: a recipe that leaves model.pooling and data.validation_fraction unset now
# describes another federation (the pooling read from the model's files, a validation split held out), and the
# quickstart's weighting moved from shard sizes to uniform (chosen on validation).
QUICKSTART_DIGEST = "260df2aff95d2fbf9609bd8ee35fc820d99cff24a760b160ae5bbb73e670c004"
OLD_SITE_RECIPE_DIGEST = "c5afb3fefa7b7dee5229bb22f5457d6c0ebb58e454a247c329eb2eb503d5c491"


def test_the_digest_of_a_shipped_recipe_is_what_it_was():
    assert recipes.load(catalog.find("quickstart")).digest() == QUICKSTART_DIGEST


def test_a_recipe_with_site_settings_under_model_and_training_loads_and_keeps_its_digest():
    old = {
        "name": "old",
        "model": {"base": "some/model", "dtype": "bfloat16", "quantization": "4bit", "quant_type": "fp4",
                  "double_quant": False, "compute_dtype": "float16"},
        "training": {"device": "cpu", "mixed_precision": "bf16", "gradient_checkpointing": True,
                     "gradient_accumulation_steps": 2, "lr": 0.001},
        "tracking": {"report_to": ["tensorboard"]},
    }
    r = recipes.from_dict(old)
    assert (r.model.quantization, r.training.device, r.training.gradient_accumulation_steps) == ("4bit", "cpu", 2)
    plain = recipes.from_dict({"name": "old", "model": {"base": "some/model"}, "training": {"lr": 0.001}})
    assert r.digest() == plain.digest() == OLD_SITE_RECIPE_DIGEST
