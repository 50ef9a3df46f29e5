"""The CLI end to end on the tiny model: a federation by hand, simulate with resume, light start-up."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from conftest import QuietReporter, recipe_dict
from typer.testing import CliRunner

from fedlora_cli import storage
from fedlora_cli.cli import app
from fedlora_cli.federation import simulate

runner = CliRunner()


def ok(args: list) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.stdout


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


def test_a_federation_by_hand(tmp_path, tiny_model_dir, reviews_csv):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(recipe_dict(tiny_model_dir, reviews_csv, method="fedsa")))
    data = tmp_path / "data"
    out = ok(["partition", reviews_csv, "--label-column", "sentiment", "--labels", "neg,pos", "-n", "3",
              "--strategy", "dirichlet", "--alpha", "0.5", "--out", data, "--plot", tmp_path / "labels.png"])
    assert "client-2" in out and (tmp_path / "labels.png").is_file()
    ok(["init", recipe, "--data", data, "--out", tmp_path / "g0"])
    for round_ in (1, 2):
        updates = []
        for k in range(3):
            update = tmp_path / f"u{round_}-{k}"
            info = json.loads(ok(["train-client", tmp_path / f"g{round_ - 1}", "--data", data / f"client-{k}.parquet",
                                  "--state", tmp_path / f"client-{k}", "--out", update, "--json"]))
            assert info["round"] == round_ and info["client_id"] == f"client-{k}"
            updates.append(update)
        agg = json.loads(ok(["aggregate", tmp_path / f"g{round_ - 1}", *updates, "--out", tmp_path / f"g{round_}", "--json"]))
        assert agg["round"] == round_ and sum(c["weight"] for c in agg["clients"]) == pytest.approx(1.0)
    g = json.loads(ok(["evaluate", tmp_path / "g2", "--data", data, "--json"]))
    p = json.loads(ok(["evaluate", tmp_path / "g2", "--data", data, "--state", tmp_path / "client-1", "--json"]))
    assert g["round"] == 2 and not g["personalised"] and p["personalised"]
    assert 0 <= g["accuracy"] <= 1 and 0 <= p["macro_f1"] <= 1
    table = ok(["aggregate", tmp_path / "g1", *[tmp_path / f"u2-{k}" for k in range(3)], "--out", tmp_path / "again"])
    assert "update norm" in table
    assert "global checkpoint" in ok(["inspect", tmp_path / "g2"])


def test_simulate_resumes_without_redoing_work(tmp_path, make_recipe, monkeypatch):
    from fedlora_cli import federation

    recipe = make_recipe("fedsa")
    reference = simulate.RunLayout(tmp_path / "reference")
    simulate.simulate(recipe, reference.root, QuietReporter())

    real = federation.train_client
    calls = []

    def crash_on_fifth(*args, **kwargs):
        calls.append(args[4])
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(federation, "train_client", crash_on_fifth)
    layout = simulate.RunLayout(tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        simulate.simulate(recipe, layout.root, QuietReporter())
    # Round 1 is complete, round 2 has client-0's update, client-1 was interrupted.
    assert layout.global_checkpoint(1).is_dir() and not layout.global_checkpoint(2).exists()
    assert layout.update(2, "client-0").is_dir() and not layout.update(2, "client-1").exists()
    assert not [p for p in layout.update(2, "client-0").parent.iterdir() if p.name.startswith(".")]
    done = {p: p.stat().st_mtime_ns for p in [layout.global_checkpoint(1), layout.update(2, "client-0")]}

    calls.clear()
    monkeypatch.setattr(federation, "train_client", real)
    resumed = []
    monkeypatch.setattr(federation, "train_client", lambda *a, **k: (resumed.append(a[4]), real(*a, **k))[1])
    simulate.simulate(recipe, layout.root, QuietReporter())
    assert resumed == ["client-1", "client-2"]
    assert {p: p.stat().st_mtime_ns for p in done} == done
    # The resumed run is bit-identical to the uninterrupted one.
    same = storage.read_global(layout.global_checkpoint(2)).manifest.digest
    assert same == storage.read_global(reference.global_checkpoint(2)).manifest.digest


def test_simulate_refuses_a_different_recipe_in_the_same_folder(tmp_path, make_recipe):
    layout = simulate.RunLayout(tmp_path / "run")
    simulate.simulate(make_recipe("ffa"), layout.root, QuietReporter())
    from fedlora_cli.errors import FedloraError

    with pytest.raises(FedloraError, match="different recipe"):
        simulate.simulate(make_recipe("ffa", lr=0.5), layout.root, QuietReporter())


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


def test_accuracy_on_mix_by_hand():
    from fedlora_cli.model.evaluation import accuracy_on_mix

    assert accuracy_on_mix([1.0, 0.5], [30, 10]) == pytest.approx(0.875)
    assert accuracy_on_mix([None, 0.5], [0, 10]) == pytest.approx(0.5)  # a class the client lacks is not needed
    assert accuracy_on_mix([None, 0.5], [3, 10]) is None  # ...but one it holds must be in the test split


def test_recipes_commands(tmp_path):
    assert "quickstart" in ok(["recipes", "list"])
    assert "method: ffa" in ok(["recipes", "show", "quickstart"])
    ok(["recipes", "copy", "quickstart", tmp_path / "mine.yaml"])
    assert "ok" in ok(["recipes", "validate", tmp_path / "mine.yaml", "quickstart"])
