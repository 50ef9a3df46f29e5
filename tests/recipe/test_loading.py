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
