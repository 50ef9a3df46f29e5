"""fedlora_cli.cli.simulate: the simulate command: its round table, JSON and plots, and --overwrite's refusal."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import recipe_dict

from cli.helpers import fails, ok
from fedlora_cli.federation import simulate


def test_simulate_cli_prints_the_round_table(tmp_path, tiny_model_dir, reviews_csv):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(recipe_dict(tiny_model_dir, reviews_csv, method="fedsa")))
    out = ok(["simulate", recipe, "--out", tmp_path / "run", "--rounds", "1"])
    assert "global" in out and "upload" in out and "│ 1 " in out
    data = json.loads(ok(["simulate", recipe, "--out", tmp_path / "run", "--rounds", "1", "--json",
                          "--plot", tmp_path / "figures" / "curves.png"]))
    rows = data["rounds"]
    assert len(rows) == 1 and rows[0]["upload_bytes"] > 0 and rows[0]["personalised_accuracy"] is not None
    # Learning curves: in the run folder by default, or where --plot says.
    assert (tmp_path / "run" / "metrics" / "rounds.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert data["plot"] == str(tmp_path / "figures" / "curves.png")
    assert (tmp_path / "figures" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Class recalls reproduce the accuracy on the test split's own mix, and the personalised accuracy on each
    # client's label mix is their reweighting by that client's label counts, averaged over clients.
    layout = simulate.RunLayout(tmp_path / "run")
    metrics = json.loads(layout.metrics(1).read_text())
    part = json.loads((layout.data / "partition.json").read_text())
    test_counts = part["test"]["label_counts"]
    by_hand = sum(n * r for n, r in zip(test_counts, metrics["global"]["class_recall"])) / sum(test_counts)
    assert by_hand == pytest.approx(metrics["global"]["accuracy"])
    own = []
    for client in part["clients"]:
        recall = metrics["personalised"][client["id"]]["class_recall"]
        counts = client["label_counts"]
        own.append(sum(n * r for n, r in zip(counts, recall) if n) / sum(counts))
    assert rows[0]["personalised_accuracy_own_mix"] == pytest.approx(sum(own) / len(own))


def test_simulate_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path, tiny_model_dir, reviews_csv):
    raw = recipe_dict(tiny_model_dir, reviews_csv)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    precious = tmp_path / "thesis"
    precious.mkdir()
    (precious / "chapter-1.tex").write_text("...")
    fails(["simulate", path, "--out", precious, "--overwrite"], "not a fedlora simulate run")
    assert (precious / "chapter-1.tex").read_text() == "..."
