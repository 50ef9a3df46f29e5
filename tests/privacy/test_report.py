"""fedlora_cli.privacy.report: what `fedlora privacy report` says was spent, against what aggregate printed and the
releases no checkpoint shows."""

from __future__ import annotations

import json

import pytest
from conftest import exact_gaussian_epsilon, recipe_dict
from typer.testing import CliRunner

from fedlora_cli import recipe as recipes, storage
from fedlora_cli.cli import app

runner = CliRunner()


def test_server_epsilon_reported_later_is_the_one_aggregate_printed(make_recipe, federation_copy, tmp_path):
    layout = federation_copy(make_recipe("fedavg"))
    updates = [str(layout.update(1, c)) for c in ("client-0", "client-1", "client-2")]
    result = runner.invoke(app, ["aggregate", str(layout.global_checkpoint(0)), *updates, "--out", str(tmp_path / "g"),
                                 "--dp-clip", "0.5", "--dp-noise", "0.8", "--dp-delta", "1e-3", "--json"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)["server_epsilon"]
    report = runner.invoke(app, ["privacy", "report", str(tmp_path / "g"), "--json"])
    assert report.exit_code == 0, report.output
    entry = json.loads(report.stdout)[0]
    assert entry["delta"] == 1e-3 and entry["epsilon"] == pytest.approx(printed)
    assert printed == pytest.approx(exact_gaussian_epsilon([(0.8, 1)], 1e-3), rel=1e-4)


def test_privacy_report_of_a_run_counts_releases_its_checkpoints_do_not_show(tiny_model_dir, reviews_csv, federation_copy, tmp_path):
    raw = recipe_dict(tiny_model_dir, reviews_csv)
    raw["server_privacy"] = {"clip_norm": 1.0, "noise_multiplier": 2.0}
    raw["federation"]["rounds"] = 1
    layout = federation_copy(recipes.from_dict(raw))
    updates = [str(layout.update(1, c)) for c in ("client-0", "client-1", "client-2")]
    # Round 1 aggregated a second time, outside the run: global/round-001 still shows one release.
    again = runner.invoke(app, ["aggregate", str(layout.global_checkpoint(0)), *updates, "--out", str(tmp_path / "elsewhere")])
    assert again.exit_code == 0, again.output
    assert storage.read_global(layout.global_checkpoint(1)).manifest.server_privacy_ledger == [[2.0, 1.0, 1]]
    report = runner.invoke(app, ["privacy", "report", str(layout.root), "--json"])
    assert report.exit_code == 0, report.output
    server = [e for e in json.loads(report.stdout) if e["who"].startswith("server")]
    assert len(server) == 1 and len(server[0]["history"]) == 2
    assert server[0]["epsilon"] == pytest.approx(exact_gaussian_epsilon([(2.0, 2)], 1e-5), rel=1e-4)
    assert server[0]["accountant"] == "gaussian"


def test_privacy_report_of_a_flower_run_shows_what_each_clients_update_reports(tiny_model_dir, reviews_csv,
                                                                               federation_copy):
    from conftest import private_recipe

    import shutil

    layout = federation_copy(recipes.from_dict(private_recipe(tiny_model_dir, reviews_csv, noise_multiplier=1.0)))
    spent = {c: storage.latest_state(layout.state(c)).manifest.privacy["epsilon"]
             for c in ("client-0", "client-1", "client-2")}
    # A Flower run folder: the client states stayed at the sites.
    shutil.rmtree(layout.root / "clients")
    report = runner.invoke(app, ["privacy", "report", str(layout.root), "--json"])
    assert report.exit_code == 0, report.output
    entries = json.loads(report.stdout)
    assert {e["who"].split()[1]: e["epsilon"] for e in entries} == pytest.approx(spent)
    assert all(e["epsilon"] > 0 and "as its update reports" in e["who"] for e in entries)
