"""fedlora_cli.cli.privacy: privacy plan."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from fedlora_cli.cli import app

runner = CliRunner()


def test_privacy_plan_command():
    result = runner.invoke(app, ["privacy", "plan", "--epsilon", "3", "--examples", "2500", "--batch-size", "32",
                                 "--steps", "40", "--rounds", "3", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["noise_multiplier"] > 0
    assert data["epsilon_check"] <= 3.0 and data["epsilon_check"] == pytest.approx(3.0, rel=0.02)
