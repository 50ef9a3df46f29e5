"""fedlora_cli.privacy.ledgers: the coordinator's DP-FedAvg ledger, refused when it is not this federation's."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from fedlora_cli.cli import app

runner = CliRunner()


def test_a_ledger_that_misses_the_checkpoints_history_is_refused(make_recipe, federation_copy, tmp_path):
    layout = federation_copy(make_recipe("fedavg"))
    updates = [str(layout.update(1, c)) for c in ("client-0", "client-1", "client-2")]
    dp = ["--dp-clip", "0.5", "--dp-noise", "1.0"]
    assert runner.invoke(app, ["aggregate", str(layout.global_checkpoint(0)), *updates, "--out", str(tmp_path / "g1"), *dp]).exit_code == 0
    # A ledger of another federation, empty, given for a checkpoint that already has one release in its history.
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"format_version": 1, "releases": []}))
    result = runner.invoke(app, ["aggregate", str(tmp_path / "g1"), *updates, "--out", str(tmp_path / "g2"), *dp,
                                 "--server-ledger", str(other)])
    assert result.exit_code == 1 and "not this federation's" in result.output, result.output
    other.write_text(json.dumps({"format_version": 1, "releases": [{"noise_multiplier": "x"}]}))
    result = runner.invoke(app, ["aggregate", str(tmp_path / "g1"), *updates, "--out", str(tmp_path / "g2"), *dp,
                                 "--server-ledger", str(other)])
    assert result.exit_code == 1 and "malformed" in result.output, result.output
    assert not (tmp_path / "g2").exists()
