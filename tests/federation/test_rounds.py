"""fedlora_cli.federation.rounds: the one round engine. A round asks the recipe's clients, skips those whose
update is already current, collects the others through a Sites implementation, applies the participation rule
before anything reaches the run folder, aggregates, evaluates, and its row is the same when it is read back after a
restart. The site side (site_round) sends a round's update again instead of training it twice."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
from conftest import QuietReporter

from fedlora_cli import federation, storage
from fedlora_cli.errors import FedloraError
from fedlora_cli.federation import rounds, simulate
from fedlora_cli.federation.rounds import Collected, Federation, TestData


class ScriptedSites:
    """Sites whose clients answer with updates copied from a finished run (no training), or not at all."""

    def __init__(self, source: simulate.RunLayout, silent: set[str] = frozenset()):
        self.source, self.silent = source, set(silent)
        self.asked: list[list[str]] = []

    def reachable(self, g, clients):
        return list(clients)

    def train(self, g, clients, staging: Path):
        self.asked.append(list(clients))
        r = g.manifest.round + 1
        got = {}
        for cid in clients:
            if cid in self.silent:
                continue
            got[cid] = staging / cid
            shutil.copytree(self.source.update(r, cid), got[cid])
        return Collected(got, wire_bytes=123)

    def evaluate(self, g):
        return {}

    def kept_loss(self, round_, client_id):
        return None


class Said(QuietReporter):
    def __init__(self):
        self.lines, self.rows = [], []

    def stage(self, text):
        self.lines.append(text)

    def round_done(self, row):
        self.rows.append(row)


def _engine(recipe, finished: simulate.RunLayout, root: Path, sites) -> tuple[Federation, Said]:
    """An engine over a new run folder that starts from the finished run's round 0 (same partition, same init)."""
    layout = simulate.RunLayout(root)
    shutil.copytree(finished.data, layout.data)
    shutil.copytree(finished.global_checkpoint(0), layout.global_checkpoint(0))
    part = json.loads((layout.data / "partition.json").read_text())
    num_labels = federation.Global.of(layout.global_checkpoint(0)).manifest.num_labels
    benches = rounds.Benches(recipe, num_labels)
    said = Said()
    return Federation(recipe, layout, sites, said, benches=benches, test=TestData(None, recipe, num_labels),
                      partition=part), said


def test_collected_updates_make_the_round_the_simulation_made(make_recipe, cached_federation, tmp_path):
    # Prepare: the updates a simulation trained, handed back through another Sites implementation
    recipe = make_recipe("fedavg")
    finished = cached_federation(recipe)
    sites = ScriptedSites(finished)
    engine, said = _engine(recipe, finished, tmp_path / "run", sites)
    # Execute
    rows = list(engine.rounds())
    # Assert: the same global checkpoints, bit for bit, from updates staged and then placed in the run folder
    for r in (1, 2):
        assert (storage.read_global(engine.layout.global_checkpoint(r)).manifest.digest
                == storage.read_global(finished.global_checkpoint(r)).manifest.digest)
    assert sites.asked == [["client-0", "client-1", "client-2"]] * 2
    assert [row["wire_bytes"] for row in rows] == [123, 123]
    assert [row["clients"] for row in rows] == [3, 3] and rows[0]["left_out"] == []
    assert not (engine.layout.root / rounds.STAGING_DIR).exists()
    assert said.rows == rows


def test_a_restart_asks_only_for_missing_updates_and_reads_the_same_rows_back(make_recipe, cached_federation,
                                                                              tmp_path):
    recipe = make_recipe("fedavg")
    finished = cached_federation(recipe)
    engine, _ = _engine(recipe, finished, tmp_path / "run", ScriptedSites(finished))
    first = list(engine.rounds())
    # The coordinator stopped after client-1's update of round 2 came in.
    shutil.rmtree(engine.layout.global_checkpoint(2))
    for cid in ("client-0", "client-2"):
        shutil.rmtree(engine.layout.update(2, cid))
    sites = ScriptedSites(finished)
    again, said = _engine(recipe, finished, tmp_path / "again", sites)
    shutil.rmtree(again.layout.root)
    shutil.copytree(engine.layout.root, again.layout.root)
    # Execute
    rows = list(again.rounds())
    # Assert
    assert sites.asked == [["client-0", "client-2"]]
    assert "round 2: updates of client-1 already in the run folder; not asked again" in said.lines
    assert "resuming" in said.lines[0] and "after round 1" in said.lines[0]
    keep = lambda row: {k: v for k, v in row.items() if k not in ("wire_bytes", "wall_seconds")}  # noqa: E731
    assert [keep(r) for r in rows] == [keep(r) for r in first]
    assert rows[0]["wall_seconds"] is None and rows[1]["wall_seconds"] is not None  # round 1 was read back


def test_too_few_updates_fail_the_round_in_one_line_writing_nothing(make_recipe, cached_federation, tmp_path):
    recipe = make_recipe("fedavg")
    recipe = dataclasses.replace(recipe, federation=dataclasses.replace(recipe.federation, min_clients=3))
    finished = cached_federation(make_recipe("fedavg"))
    engine, _ = _engine(recipe, finished, tmp_path / "run", ScriptedSites(finished, silent={"client-1"}))
    # Execute / Assert
    with pytest.raises(FedloraError, match=r"^round 1: 2 client update\(s\) of 3 asked, fewer than "
                                           r"federation.min_clients = 3; nothing written$"):
        list(engine.rounds())
    assert not engine.layout.global_checkpoint(1).exists()
    assert not (engine.layout.root / "updates").exists()
    assert not (engine.layout.root / rounds.STAGING_DIR).exists()


def test_a_round_asked_twice_sends_the_same_update_and_trains_nothing(make_recipe, cached_federation, tmp_path,
                                                                      monkeypatch):
    # Prepare: a client that trained round 1 (its state and its update in place)
    finished = cached_federation(make_recipe("fedsa"))
    state, out = tmp_path / "state", tmp_path / "update"
    shutil.copytree(finished.state("client-0"), state)
    shutil.copytree(finished.update(1, "client-0"), out)
    g0 = federation.Global.of(finished.global_checkpoint(0))
    monkeypatch.setattr(federation.client, "train_client", lambda *a, **k: pytest.fail("trained again"))
    # Execute
    done = federation.site_round(g0, finished.data / "client-0.parquet", state, out, "client-0")
    # Assert
    assert done.resent and done.update.manifest == storage.read_update(finished.update(1, "client-0")).manifest
    assert done.state.manifest.round == 1
    # Another client's update, or one from another parent, is not this round's answer: it is trained.
    trained = []
    monkeypatch.setattr(federation.client, "train_client", lambda *a, **k: trained.append(a[4]))
    federation.site_round(g0, finished.data / "client-1.parquet", state, out, "client-1")
    g1 = federation.Global.of(finished.global_checkpoint(1))
    federation.site_round(g1, finished.data / "client-0.parquet", state, out, "client-0")
    assert trained == ["client-1", "client-0"]


def test_train_client_run_again_sends_what_it_made_and_overwrite_trains_again(make_recipe, cached_federation,
                                                                              tmp_path):
    from typer.testing import CliRunner

    from fedlora_cli.cli import app

    def run_cli(args):
        return CliRunner().invoke(app, [str(a) for a in args])

    finished = cached_federation(make_recipe("fedavg"))
    args = ["train-client", finished.global_checkpoint(0), "--data", finished.data / "client-0.parquet", "--state",
            tmp_path / "client-0", "--out", tmp_path / "u"]
    first = run_cli(args + ["--json"])
    assert first.exit_code == 0, first.output
    written = (tmp_path / "u" / storage.UPDATE_MANIFEST).stat().st_mtime_ns
    again = run_cli(args)
    assert again.exit_code == 0, again.output
    assert "not trained again" in again.output
    assert (tmp_path / "u" / storage.UPDATE_MANIFEST).stat().st_mtime_ns == written
    assert storage.state_rounds(tmp_path / "client-0") == [1]
    assert run_cli(args + ["--overwrite"]).exit_code == 0
    assert (tmp_path / "u" / storage.UPDATE_MANIFEST).stat().st_mtime_ns != written


def test_a_client_the_round_did_not_ask_is_refused_before_training(tiny_model_dir, reviews_csv, partition_dir,
                                                                   tmp_path):
    from conftest import recipe_dict

    from fedlora_cli import recipe as recipes
    from fedlora_cli.federation import sampling

    raw = recipe_dict(tiny_model_dir, reviews_csv)
    raw["federation"].update(clients_per_round=1)
    recipe = recipes.from_dict(raw)
    g0 = federation.init(recipe, tmp_path / "g0", partition=json.loads((partition_dir / "partition.json").read_text()))
    (asked,) = sampling.asked(recipe.federation, recipe.training.seed, 1)
    other = next(c for c in ("client-0", "client-1", "client-2") if c != asked)
    # Under DP-SGD its training would spend budget on an update the coordinator refuses: nothing is trained.
    with pytest.raises(FedloraError, match=rf"^refusing to train client '{other}', which round 1 did not ask \(see "
                                           r"'fedlora sample'\): the coordinator would refuse its update; nothing written$"):
        federation.train_client(g0, partition_dir / f"{other}.parquet", tmp_path / "state", tmp_path / "u", other)
    assert not (tmp_path / "u").exists() and not (tmp_path / "state").exists()


# Issue 28: a Poisson sample short of min_clients (fixed by seed and round) used to dead-end the federation.

def empty_first_round(tiny_model_dir, reviews_csv, **extra) -> dict:
    """conftest's recipe (3 clients, 2 rounds) under Poisson sampling of 1 client a round, with the first training
    seed whose round 1 asks nobody and round 2 somebody."""
    from conftest import recipe_dict

    from fedlora_cli import recipe as recipes
    from fedlora_cli.federation import sampling

    raw = recipe_dict(tiny_model_dir, reviews_csv)
    raw["federation"].update(clients_per_round=1, sampling="poisson")
    raw.update(extra)
    for seed in range(200):
        raw["training"]["seed"] = seed
        f = recipes.from_dict(raw).federation
        if not sampling.asked(f, seed, 1) and sampling.asked(f, seed, 2):
            return raw
    raise AssertionError("no seed found")


def test_a_poisson_round_that_asks_nobody_is_skipped_in_simulate_with_the_global_carried_forward(
        tiny_model_dir, reviews_csv, tmp_path):
    from fedlora_cli import recipe as recipes

    recipe = recipes.from_dict(empty_first_round(tiny_model_dir, reviews_csv))
    layout = storage.RunLayout(tmp_path / "run")
    rows = simulate.simulate(recipe, layout.root, QuietReporter())
    g0, g1, g2 = (storage.read_global(layout.global_checkpoint(r)) for r in (0, 1, 2))
    assert g1.manifest.aggregation["strategy"] == "skipped" and g1.manifest.clients == [] and g1.manifest.asked == []
    assert g1.manifest.tensor_digests == g0.manifest.tensor_digests  # carried forward, bit for bit
    assert g2.manifest.clients and g2.manifest.tensor_digests != g1.manifest.tensor_digests
    assert not layout.update(1, "client-0").exists()
    assert rows[0]["skipped"] and rows[0]["clients"] == 0 and not rows[1]["skipped"]


def test_by_hand_a_skipped_round_is_aggregated_with_no_updates_and_refuses_any(tiny_model_dir, reviews_csv,
                                                                               partition_dir, tmp_path):
    import yaml

    from cli.helpers import fails, ok

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(empty_first_round(tiny_model_dir, reviews_csv)))
    ok(["init", path, "--data", partition_dir, "--out", tmp_path / "g0"])
    sample = json.loads(ok(["sample", tmp_path / "g0", "--json"]))
    assert sample["asked"] == [] and sample["round_is"] == "skipped"
    fails(["train-client", tmp_path / "g0", "--data", partition_dir / "client-0.parquet", "--state",
           tmp_path / "client-0", "--out", tmp_path / "u0"], "round 1 did not ask")
    ok(["aggregate", tmp_path / "g0", "--out", tmp_path / "g1"])
    g1 = storage.read_global(tmp_path / "g1")
    assert g1.manifest.round == 1 and g1.manifest.aggregation["strategy"] == "skipped"
    assert g1.manifest.digest == storage.read_global(tmp_path / "g0").manifest.digest
    # Round 2 asks somebody: it trains from the carried global as any round does.
    (asked,) = json.loads(ok(["sample", tmp_path / "g1", "--json"]))["asked"]
    ok(["train-client", tmp_path / "g1", "--data", partition_dir / f"{asked}.parquet", "--state", tmp_path / asked,
        "--out", tmp_path / "u2"])
    ok(["aggregate", tmp_path / "g1", tmp_path / "u2", "--out", tmp_path / "g2"])
    assert storage.read_global(tmp_path / "g2").manifest.clients == [asked]


def test_under_dp_fedavg_a_round_that_asks_nobody_is_a_noise_only_release_the_ledger_counts(
        tiny_model_dir, reviews_csv, tmp_path):
    import numpy as np
    from safetensors.numpy import load_file as load_arrays

    from fedlora_cli import privacy, recipe as recipes

    raw = empty_first_round(tiny_model_dir, reviews_csv,
                            server_privacy={"clip_norm": 0.5, "noise_multiplier": 1.0, "delta": 1e-5})
    recipe = recipes.from_dict(raw)
    layout = storage.RunLayout(tmp_path / "run")
    simulate.simulate(recipe, layout.root, QuietReporter())
    g1 = storage.read_global(layout.global_checkpoint(1))
    assert g1.manifest.clients == [] and g1.manifest.aggregation["strategy"] != "skipped"
    assert len(g1.manifest.server_privacy_ledger) == 1  # counted as a release
    before = load_arrays(str(layout.global_checkpoint(0) / storage.ADAPTER_WEIGHTS))
    after = load_arrays(str(layout.global_checkpoint(1) / storage.ADAPTER_WEIGHTS))
    moved = {n: after[n] - before[n] for n in before if not np.array_equal(after[n], before[n])}
    assert moved, "the noise moved the global"
    # Noise alone: std = sigma * C / m with m = q N = 1 expected client.
    spread = np.concatenate([d.ravel() for d in moved.values()]).std()
    assert spread == pytest.approx(1.0 * 0.5 / 1, rel=0.2)
    g2 = storage.read_global(layout.global_checkpoint(2))
    assert len(g2.manifest.server_privacy_ledger) == 2
    ledger = privacy.read_server_ledger(privacy.server_ledger_path(g2))
    assert len(ledger.releases) == 2
