"""fedlora_cli.cli.simulate: the simulate command: its round table (fitting 80 columns, showing what means
something for the method), JSON and plots, and --overwrite's refusal."""

from __future__ import annotations

import io
import json
import shutil

import pytest
import yaml
from conftest import QuietReporter, private_recipe, recipe_dict
from rich.console import Console

from cli.helpers import fails, ok
from fedlora_cli import adapters
from fedlora_cli.cli.simulate import _partial_global_note, _rounds_table
from fedlora_cli.federation import simulate
from tracking.helpers import mlflow_history, mlflow_runs, tensorboard_scalars, wandb_history


def test_simulate_cli_prints_the_round_table(tmp_path, tiny_model_dir, reviews_csv):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(recipe_dict(tiny_model_dir, reviews_csv, method="fedsa")))
    out = ok(["simulate", recipe, "--out", tmp_path / "run", "--rounds", "1"])
    assert "pers." in out and "upload" in out and "│ 1 " in out
    assert "no model on its own" in " ".join(out.split())  # FedSA-LoRA: the note on the global checkpoint
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


def rendered(renderable, width: int = 80) -> list[str]:
    """The lines a terminal ``width`` columns wide shows."""
    console = Console(width=width, record=True, file=io.StringIO())
    console.print(renderable)
    return console.export_text().splitlines()


def table_of(recipe, rows, width: int = 80) -> tuple[list[str], list[str]]:
    """The round table's lines at ``width``, and those of its body: one per row unless a cell wrapped."""
    plan = adapters.plan(recipe.federation.method, recipe.federation.head, recipe.adapter.kind)
    lines = rendered(_rounds_table(recipe, plan, rows, "runs/quickstart"), width)
    return lines, [line for line in lines if line.startswith("│")]


def test_a_quickstart_shaped_round_table_fits_80_columns(make_recipe, cached_federation):
    recipe = make_recipe("ffa")  # the quickstart's method and head policy
    rows = simulate.simulate(recipe, cached_federation(recipe).root, QuietReporter())  # resumes: writes nothing
    # The quickstart's sizes: 226.9 KB uploaded per client per round (it once wrapped over two lines), minutes of
    # training, three rounds.
    rows = [{**row, "round": k, "upload_bytes_per_client": 226_944, "seconds": 412.3} for k, row in
            enumerate(rows + rows[-1:], start=1)]
    lines, body = table_of(recipe, rows)
    assert len(body) == len(rows)  # no cell wrapped
    assert max(len(line) for line in lines) <= 80
    assert [cell.strip() for cell in body[0].split("│")[1:-1]] == [
        "1", f"{rows[0]['train_loss']:.4f}", f"{rows[0]['validation_global_accuracy']:.4f}",
        f"{rows[0]['global_accuracy']:.4f}", "227KB", "412",
    ]
    header = "\n".join(lines[: lines.index(next(line for line in lines if line.startswith("┡")))])
    assert "val" in header and "test" in header
    # FFA-LoRA keeps nothing at home: no personalised column (it would be empty), no note.
    assert "pers." not in "\n".join(lines) and _partial_global_note(recipe, adapters.plan("ffa", "shared"), rows) is None
    # Wider, the same table: nothing is cut off or spread out.
    assert table_of(recipe, rows, 200)[1] == body


def test_the_fullest_round_table_fits_80_columns(strategy_recipe):
    # Global scores on validation and test, personalised ones on test (clients of lower rank), DP-SGD's epsilon,
    # three-digit seconds: nine columns.
    recipe = strategy_recipe("fedavg", client_ranks={"client-0": 2}, aggregation="svd")
    row = {"train_loss": 0.6931, "global_accuracy": 0.8123, "global_macro_f1": 0.8011, "global_loss": 0.41,
           "personalised_accuracy": 0.8523, "personalised_accuracy_own_mix": 0.8611, "personalised_loss": 0.38,
           "validation_global_accuracy": 0.8101, "validation_personalised_accuracy": 0.8402,
           "upload_bytes_per_client": 99_949, "seconds": 1234.0, "epsilon": 12.345}
    rows = [{**row, "round": k} for k in range(1, 11)]
    lines, body = table_of(recipe, rows)
    assert len(body) == 10 and max(len(line) for line in lines) <= 80
    assert [cell.strip() for cell in body[-1].split("│")[1:-1]] == [
        "10", "0.6931", "0.8101", "0.8123", "0.8523", "0.8611", "99.9KB", "1234", "12.35"
    ]


def test_a_fedsa_round_table_leads_with_the_personalised_scores_and_says_why(make_recipe, cached_federation):
    recipe = make_recipe("fedsa")
    rows = simulate.simulate(recipe, cached_federation(recipe).root, QuietReporter())
    lines, body = table_of(recipe, rows)
    header = "\n".join(lines[: lines.index(next(line for line in lines if line.startswith("┡")))])
    assert "pers." in header and "own" in header and "global" not in header
    assert [cell.strip() for cell in body[0].split("│")[1:-1]][2:5] == [
        f"{rows[0]['validation_personalised_accuracy']:.4f}", f"{rows[0]['personalised_accuracy']:.4f}",
        f"{rows[0]['personalised_accuracy_own_mix']:.4f}"
    ]
    note = _partial_global_note(recipe, adapters.plan("fedsa", "shared"), rows)
    assert "the global B stays 0" in note and "no model on its own" in note
    accuracies = sorted(row["global_accuracy"] for row in rows)
    assert (f"accuracy {accuracies[0]:.4f} in every round" if accuracies[0] == accuracies[-1]
            else f"accuracy {accuracies[0]:.4f} to {accuracies[-1]:.4f}") in note


# --------------------------------------------------------------------------------------------------------
# Tracking (--report-to, the recipe's tracking section)


def test_simulate_logs_to_every_tracker_what_json_reports(tmp_path, tiny_model_dir, reviews_csv):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(recipe_dict(tiny_model_dir, reviews_csv, method="fedsa")))
    run = tmp_path / "run"
    args = ["simulate", recipe, "--out", run, "--report-to", "tensorboard,mlflow,wandb", "--json"]
    rows = json.loads(ok(args))["rounds"]  # and nothing but JSON on stdout
    tracked = run / "tracking"
    scalars = tensorboard_scalars(tracked / "tensorboard" / "tiny-fedsa" / "run")
    history = mlflow_history(tracked / "mlflow", "tiny-fedsa")
    _, wandb_rows = wandb_history(tracked / "wandb")
    wandb_rounds = [r for r in wandb_rows if "round" in r]
    for key in ("global_accuracy", "personalised_accuracy", "personalised_accuracy_own_mix", "train_loss",
                "upload_bytes_per_client"):
        expected = [(row["round"], pytest.approx(row[key], rel=1e-6)) for row in rows]  # TensorBoard keeps float32
        assert scalars[f"round/{key}"] == expected and history[f"round/{key}"] == expected, key
        assert [(r["round"], r[f"round/{key}"]) for r in wandb_rounds] == expected, key
    # Each client's training loss per step, on one axis across the rounds (3 steps a round).
    for cid in ("client-0", "client-1", "client-2"):
        assert [step for step, _ in scalars[f"step/{cid}/train_loss"]] == [1, 2, 3, 4, 5, 6]
    # The run again (nothing left to do) continues the same tracker runs and logs nothing twice.
    ok(args)
    assert mlflow_history(tracked / "mlflow", "tiny-fedsa") == history
    assert tensorboard_scalars(tracked / "tensorboard" / "tiny-fedsa" / "run") == scalars
    # evaluate logs under the same names, in the run the global checkpoint belongs to (here into another store).
    metrics = json.loads(ok(["evaluate", run / "global" / "round-002", "--data", run / "data", "--json",
                             "--report-to", "mlflow", "--tracking-dir", tmp_path / "elsewhere"]))
    assert mlflow_history(tmp_path / "elsewhere" / "mlflow", "tiny-fedsa")["round/global_accuracy"] == [
        (2, pytest.approx(metrics["accuracy"]))] == [(2, pytest.approx(rows[1]["global_accuracy"]))]
    (_, (first,)), (_, (second,)) = mlflow_runs(tracked / "mlflow", "tiny-fedsa"), mlflow_runs(
        tmp_path / "elsewhere" / "mlflow", "tiny-fedsa")
    assert first.data.tags["fedlora.run_id"] == second.data.tags["fedlora.run_id"]  # one fedlora run


def test_a_dp_run_logs_no_client_loss_at_the_coordinator(tmp_path, tiny_model_dir, reviews_csv):
    raw = private_recipe(tiny_model_dir, reviews_csv, noise_multiplier=1.0)
    raw["federation"]["rounds"] = 1
    raw["tracking"] = {"report_to": ["tensorboard", "mlflow"]}  # the recipe asks; no --report-to
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    run = tmp_path / "run"
    (row,) = json.loads(ok(["simulate", recipe, "--out", run, "--json"]))["rounds"]
    scalars = tensorboard_scalars(run / "tracking" / "tensorboard" / "tiny-ffa" / "run")
    history = mlflow_history(run / "tracking" / "mlflow", "tiny-ffa")
    assert row["train_loss"] is not None  # the simulation's own table reads it from the client states...
    for keys in (scalars, history):  # ... its trackers, the coordinator's view, hold no client's loss
        assert not [key for key in keys if "loss" in key and "global" not in key]
        assert keys["round/epsilon"] == [(1, pytest.approx(row["epsilon"]))]
    # The coordinator by hand (the recipe in the global checkpoint asks for the trackers): no loss either, and the
    # table leaves the empty column out.
    table = ok(["aggregate", run / "global" / "round-000", *sorted((run / "updates" / "round-001").iterdir()),
                "--out", tmp_path / "again"])
    assert "weight" in table and "loss" not in table
    scalars = tensorboard_scalars(run / "tracking" / "tensorboard" / "tiny-ffa" / "run")
    assert "round/client-0/weight" in scalars and not [key for key in scalars if "train_loss" in key]
    # A client tracks its own loss, in its own state folder: that is what it sees anyway.
    state = tmp_path / "client-0"
    shutil.copytree(run / "clients" / "client-0", state)
    ok(["train-client", run / "global" / "round-001", "--data", run / "data" / "client-0.parquet", "--state", state,
        "--out", tmp_path / "update", "--report-to", "tensorboard"])
    own = tensorboard_scalars(state / "tracking" / "tensorboard" / "tiny-ffa" / "client-0")
    assert [step for step, _ in own["step/client-0/train_loss"]] == [4, 5, 6]  # its second round
    assert own["round/client-0/epsilon"][0][0] == 2


def test_a_missing_tracker_package_fails_before_any_work(tmp_path, tiny_model_dir, reviews_csv, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(recipe_dict(tiny_model_dir, reviews_csv)))
    fails(["simulate", recipe, "--out", tmp_path / "run", "--report-to", "tensorboard,mlflow"],
          "tracker 'mlflow' needs the mlflow-skinny package", "pip install 'fedlora[mlflow]'")
    fails(["simulate", recipe, "--out", tmp_path / "run", "--report-to", "tensorbored"], "unknown tracker 'tensorbored'")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("threads", [1025, 2**40])
def test_simulate_refuses_a_thread_count_beyond_the_bound_before_any_work(tmp_path, tiny_model_dir, reviews_csv,
                                                                          threads):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(recipe_dict(tiny_model_dir, reviews_csv)))
    fails(["simulate", recipe, "--out", tmp_path / "run", "--threads", threads], "--threads must be 0", "up to 1024")
    assert not (tmp_path / "run").exists()
