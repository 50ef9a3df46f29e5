"""fedlora_cli.cli.app: light start-up (no torch for --help), and loading a recipe file with --set overrides: a bad
file or key is one error line."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from conftest import recipe_dict

from cli.helpers import fails


@pytest.mark.parametrize("args", [["--help"], ["train-client", "--help"], ["aggregate", "--help"], ["simulate", "--help"]])
def test_help_does_not_import_torch(args):
    code = (
        "import sys\n"
        "from fedlora_cli.cli import app\n"
        f"try:\n    app({args!r})\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'datasets', 'pandas') if m in sys.modules]\n"
        "print('HEAVY=' + ','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY=\n" in out, out


def test_missing_recipe_file(tmp_path):
    out = tmp_path / "g"
    fails(["init", tmp_path / "nope.yaml", "--out", out], "recipe not found")
    assert not out.exists()


def test_unknown_recipe_key_is_named(tmp_path, tiny_model_dir, reviews_csv):
    raw = recipe_dict(tiny_model_dir, reviews_csv)
    raw["training"]["learning_rate"] = 0.1
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    fails(["init", path, "--out", tmp_path / "g"], "training.learning_rate")
    fails(["recipes", "validate", path], "training.learning_rate")


def test_unknown_override_key_is_named(tmp_path, tiny_model_dir, reviews_csv):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(tiny_model_dir, reviews_csv)))
    fails(["recipes", "validate", path, "--set", "federation.methd=ffa"], "federation.methd")
    fails(["recipes", "validate", path, "--set", "federation.method=fedprox"], "federation.method")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--rounds", "0"], "--rounds must be at least 1"),
        (["--method", "fedprox"], "--method must be one of fedavg, ffa, fedsa; got 'fedprox'"),
        (["--device", "tpu"], "--device must be one of auto, cpu, cuda, mps or 'cuda:N'; got 'tpu'"),
        (["--set", "federation.rounds=0"], "recipe key 'federation.rounds' must be at least 1"),
    ],
)
def test_an_option_over_the_recipe_is_named_as_the_user_typed_it(tmp_path, tiny_model_dir, reviews_csv, options,
                                                                 message):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(tiny_model_dir, reviews_csv)))
    fails(["simulate", path, "--out", tmp_path / "run", *options], message)
    assert not (tmp_path / "run").exists()
