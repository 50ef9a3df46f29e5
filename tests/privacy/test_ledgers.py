"""fedlora_cli.privacy.ledgers: the coordinator's DP-FedAvg ledger, refused when it is not this federation's."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from fedlora_cli import storage
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


def test_a_fresh_server_ledger_path_cannot_restart_the_budget_of_a_federation(make_recipe, federation_copy, tmp_path):
    """Issue 28: aggregating the same round again with a fresh --server-ledger path was accepted and reported the
    epsilon of one release. The ledger beside the checkpoints is the federation's: every release is written there
    too, and a ledger counting fewer releases is refused."""
    from cli.helpers import fails

    layout = federation_copy(make_recipe("fedavg"))
    g0 = layout.global_checkpoint(0)
    updates = [str(layout.update(1, c)) for c in ("client-0", "client-1", "client-2")]
    dp = ["--dp-clip", "0.5", "--dp-noise", "1.0", "--json"]

    def aggregate(out, *ledger):
        result = runner.invoke(app, ["aggregate", str(g0), *updates, "--out", str(tmp_path / out), *dp, *ledger])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    first = aggregate("g1", "--server-ledger", str(tmp_path / "mine.json"))  # a path of the operator's, first
    fails(["aggregate", g0, *updates, "--out", tmp_path / "again", *dp[:-1], "--server-ledger", tmp_path / "fresh.json"],
          "records 0 release(s)", "records 1", "nothing released")
    assert not (tmp_path / "again").exists() and not (tmp_path / "fresh.json").exists()
    second = aggregate("again")  # the federation's own ledger knows the first release
    assert second["server_epsilon"] > first["server_epsilon"]
    from fedlora_cli import privacy

    assert len(privacy.read_server_ledger(tmp_path / "mine.json").releases) == 1
    assert len(privacy.read_server_ledger(privacy.server_ledger_path(storage.read_global(g0))).releases) == 2
