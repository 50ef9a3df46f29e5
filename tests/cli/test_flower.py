"""fedlora flower: the app folder Flower accepts, a --node-config Flower parses, and without flwr one clear line
while every other command works."""

from __future__ import annotations

import subprocess
import sys
import tomllib

import pytest
import yaml
from conftest import recipe_dict
from cli.helpers import fails, ok

from fedlora_cli.flower import INSTALL_HINT


def test_flower_app_writes_a_pyproject_flwr_accepts(tmp_path, tiny_model_dir, reviews_csv):
    flwr_config = pytest.importorskip("flwr.common.config")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(recipe_dict(tiny_model_dir, reviews_csv)))
    ok(["flower", "app", recipe, "-o", tmp_path / "app", "--run", tmp_path / "run", "--round-timeout", "120"])
    config = tomllib.loads((tmp_path / "app" / "pyproject.toml").read_text())
    valid, errors, _ = flwr_config.validate_config(config, check_module=True, project_dir=tmp_path / "app")
    assert valid, errors
    assert config["tool"]["flwr"]["app"]["config"] == {
        "recipe": str(recipe), "run-dir": str(tmp_path / "run"), "round-timeout": 120.0,
    }
    assert [p.name for p in (tmp_path / "app").iterdir()] == ["pyproject.toml"]  # no checkpoint in the bundle
    fails(["flower", "app", recipe, "-o", tmp_path / "app", "--run", tmp_path / "run"], "already exists")


def test_flower_node_config_is_what_a_supernode_parses(tmp_path):
    flwr_config = pytest.importorskip("flwr.common.config")
    text = ok(["flower", "node-config", "--client-id", "site-a", "--data", tmp_path / "a b.csv", "--state-dir",
               tmp_path / "state", "--device", "cpu", "--gradient-checkpointing"]).strip()
    assert flwr_config.parse_config_args([text]) == {
        "client-id": "site-a", "data": str(tmp_path / "a b.csv"), "state-dir": str(tmp_path / "state"),
        "device": "cpu", "gradient-checkpointing": True,
    }
    fails(["flower", "node-config", "--client-id", "../x", "--state-dir", tmp_path], "client id '../x'")


def test_without_flwr_flower_commands_say_how_to_install_it_in_one_line(tmp_path, monkeypatch, tiny_model_dir,
                                                                        reviews_csv):
    monkeypatch.setitem(sys.modules, "flwr", None)  # import flwr now raises ImportError
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(recipe_dict(tiny_model_dir, reviews_csv)))
    fails(["flower", "app", recipe, "-o", tmp_path / "app", "--run", tmp_path / "run"], INSTALL_HINT)
    assert not (tmp_path / "app").exists()
    ok(["--help"])
    ok(["recipes", "list"])


def test_the_cli_never_imports_flwr():
    code = "import sys, fedlora_cli.cli; import fedlora_cli.flower.app_folder; print('flwr' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


def test_flower_app_report_to_goes_into_the_run_config(tmp_path, tiny_model_dir, reviews_csv):
    pytest.importorskip("flwr")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(recipe_dict(tiny_model_dir, reviews_csv)))
    ok(["flower", "app", recipe, "-o", tmp_path / "app", "--run", tmp_path / "run",
        "--report-to", "TensorBoard, mlflow"])
    config = tomllib.loads((tmp_path / "app" / "pyproject.toml").read_text())
    assert config["tool"]["flwr"]["app"]["config"]["report-to"] == "tensorboard,mlflow"
    fails(["flower", "app", recipe, "-o", tmp_path / "app2", "--run", tmp_path / "run", "--report-to", "tensorbored"],
          "unknown tracker 'tensorbored'")
    assert not (tmp_path / "app2").exists()


def test_flower_app_refuses_a_dp_budget_it_cannot_calibrate(tmp_path, tiny_model_dir, reviews_csv, partition_dir):
    import shutil

    from conftest import private_recipe

    raw = private_recipe(tiny_model_dir, reviews_csv, target_epsilon=3.0)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    # The coordinator never sees the sites' data: no noise multiplier can be calibrated for the budget.
    fails(["flower", "app", recipe, "-o", tmp_path / "app", "--run", tmp_path / "run"],
          "privacy.target_epsilon needs every site's dataset size", "set privacy.noise_multiplier")
    assert not (tmp_path / "app").exists()
    # With the noise multiplier set, or a partition in the run folder (a rehearsal on one host), it is written.
    shutil.copytree(partition_dir, tmp_path / "run" / "data")
    ok(["flower", "app", recipe, "-o", tmp_path / "app", "--run", tmp_path / "run"])
    raw["privacy"]["noise_multiplier"] = 1.1
    recipe.write_text(yaml.safe_dump(raw))
    ok(["flower", "app", recipe, "-o", tmp_path / "app2", "--run", tmp_path / "elsewhere"])
    # Or with each site calibrating its own noise to its own size: the coordinator needs no sizes.
    raw["privacy"] = {**raw["privacy"], "noise_multiplier": None, "calibration": "client"}
    recipe.write_text(yaml.safe_dump(raw))
    ok(["flower", "app", recipe, "-o", tmp_path / "app3", "--run", tmp_path / "elsewhere-too"])


def test_node_config_makes_every_existing_path_absolute(tmp_path, monkeypatch):
    for name in ("a.csv", "a-test.csv"):
        (tmp_path / name).write_text("text,sentiment\n")
    (tmp_path / "model").mkdir()
    monkeypatch.chdir(tmp_path)
    text = ok(["flower", "node-config", "--client-id", "site-a", "--data", "a.csv", "--test-data", "a-test.csv",
               "--base-model", "model", "--state-dir", "state"])
    parsed = tomllib.loads(text.replace('" ', '"\n'))
    assert parsed["data"] == str(tmp_path / "a.csv") and parsed["test-data"] == str(tmp_path / "a-test.csv")
    assert parsed["base"] == str(tmp_path / "model") and parsed["state-dir"] == str(tmp_path / "state")
