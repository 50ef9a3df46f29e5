"""fedlora_cli.recipe.loading: recipes from YAML and dicts, overrides, task defaults, and pkg: locations."""

from __future__ import annotations

import pytest
import yaml

from fedlora_cli import recipe as recipes
from fedlora_cli.errors import FedloraError


def base() -> dict:
    return {"model": {"base": "some/model"}}


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


def test_causal_defaults_target_attention_projections_and_freeze_the_head():
    r = recipes.from_dict({"model": {"base": "m", "task": "causal-lm"}})
    assert r.adapter.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"] and r.federation.head == "frozen"
    classic = recipes.from_dict({"model": {"base": "m"}})
    assert classic.adapter.target_modules == ["query", "value"] and classic.federation.head == "shared"


# override: the one way a value replaces a recipe's ----------------------------------------------------------------


def test_override_applies_values_over_a_recipe_and_leaves_it_as_it_was():
    r = recipes.from_dict(base())
    changed = recipes.override(r, {"training.lr": 0.02, "federation.rounds": None})
    assert (changed.training.lr, changed.federation.rounds) == (0.02, r.federation.rounds)
    assert r.training.lr == 5e-4
    assert recipes.override(r, {"training.lr": None}) is r


def test_override_names_the_option_the_user_typed():
    r = recipes.from_dict(base())
    with pytest.raises(FedloraError, match=r"^--rounds must be at least 1$"):
        recipes.override(r, {"federation.rounds": 0}, {"federation.rounds": "--rounds"})
    # A wrong type is named the same way (a node config's TOML or a --set value is not typed by the command line).
    with pytest.raises(FedloraError, match=r"^--accumulation-steps must be int, got '4'"):
        recipes.override(r, {"training.gradient_accumulation_steps": "4"},
                         {"training.gradient_accumulation_steps": "--accumulation-steps"})
    # A label names only a key the user set: the recipe's own mistakes keep their recipe names.
    with pytest.raises(FedloraError, match=r"^recipe key 'federation.rounds' must be at least 1"):
        recipes.override(r, {"federation.rounds": 0}, {"training.lr": "--lr"})


def test_override_replaces_a_whole_section_and_names_its_keys():
    r = recipes.from_dict(base())
    section = recipes.ServerPrivacySection(clip_norm=1.0, noise_multiplier=0.5)
    assert recipes.override(r, {"server_privacy": section}).server_privacy == section
    labels = {"server_privacy": "server privacy", "server_privacy.clip_norm": "--dp-clip"}
    with pytest.raises(FedloraError, match=r"^--dp-clip must be > 0"):
        recipes.override(r, {"server_privacy": {"clip_norm": 0.0, "noise_multiplier": 0.5}}, labels)


def test_override_of_a_raw_mapping_reads_it_like_a_file():
    assert recipes.override(base(), {"training.lr": "1e-3"}).training.lr == 1e-3
    with pytest.raises(FedloraError, match="unknown recipe key 'training.learning_rate'"):
        recipes.override(base(), {"training.learning_rate": 0.1})


def test_override_can_leave_the_clients_rules_to_the_round():
    # 0.25 of 3 planned clients trims none: refused for the recipe, left to the updates that arrive for a round.
    r = recipes.from_dict({**base(), "federation": {"clients": 3}})
    with pytest.raises(FedloraError, match="trims no client"):
        recipes.override(r, {"federation.aggregation": "trimmed-mean"})
    changed = recipes.override(r, {"federation.aggregation": "trimmed-mean"}, planned_clients=False)
    assert changed.federation.aggregation == "trimmed-mean"


def test_every_shipped_recipe_reads_back_from_its_own_mapping():
    from fedlora_cli.recipe import catalog

    for name in catalog.names():
        r = recipes.load(catalog.find(name))
        assert recipes.from_dict(r.to_dict()) == r, name
