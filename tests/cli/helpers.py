"""What the CLI tests share: running a command that must succeed, or fail the way every mistake a user can make
must: one clear error line, exit code 1, no traceback."""

from __future__ import annotations

from pathlib import Path

import yaml
from conftest import recipe_dict
from typer.testing import CliRunner

from fedlora_cli.cli import app

runner = CliRunner()


def ok(args: list) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.stdout


def fails(args: list[str], *needles: str) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    output = result.output
    assert result.exit_code == 1, output
    assert "Traceback" not in output
    assert "error:" in output
    lines = [line for line in output.strip().splitlines() if line.strip()]
    error_lines = [line for line in lines if "error:" in line]
    assert len(error_lines) == 1, output
    text = " ".join(output.split())
    for needle in needles:
        assert needle in text, f"{needle!r} not in {text!r}"
    return text


def refused(args: list, needle: str) -> str:
    """Exit code 1, no traceback, ``needle`` in the output (fewer checks than :func:`fails`)."""
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and needle in " ".join(result.output.split()), result.output
    return result.output


def write_recipe(tmp_path, tiny_model_dir, reviews_csv, method="fedavg", adapter=None, federation=None, extra=None) -> Path:
    raw = recipe_dict(tiny_model_dir, reviews_csv, method)
    raw["adapter"].update(adapter or {})
    raw["federation"].update(federation or {})
    raw.update(extra or {})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path
