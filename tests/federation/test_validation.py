"""The validation split: simulate scores every round's global (and personalised) models on it beside the test split,
evaluate reports both, and export --round best takes the round with the best validation score."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from cli.helpers import fails, ok

from fedlora_cli import federation
from fedlora_cli.data import partition as partitions
from fedlora_cli.federation.selection import choose_round
from fedlora_cli.storage.files import read_json


def test_each_round_scores_the_global_and_the_personalised_models_on_validation_and_test(make_recipe,
                                                                                        cached_federation):
    layout = cached_federation(make_recipe("fedsa"))
    for g in layout.global_checkpoints()[1:]:
        metrics = read_json(layout.metrics(int(g.name[6:])), "round metrics")
        # The scores recorded are those of the global model on the run's validation split, computed again here.
        again = federation.evaluate(g, layout.data, held_out="validation")
        assert metrics["validation"]["global"]["accuracy"] == pytest.approx(again["accuracy"])
        assert metrics["validation"]["global"]["examples"] == read_json(
            layout.data / partitions.PARTITION_MANIFEST, "partition")["validation"]["examples"]
        assert metrics["validation"]["global"]["examples"] != metrics["global"]["examples"]  # not the test split
        assert set(metrics["validation"]["personalised"]) == set(metrics["personalised"]) == {
            "client-0", "client-1", "client-2"}


def test_evaluate_reports_validation_beside_test_and_a_site_may_name_its_own(make_recipe, cached_federation,
                                                                           tmp_path):
    layout = cached_federation(make_recipe("ffa"))
    g = layout.global_checkpoints()[-1]
    both = json.loads(ok(["evaluate", g, "--data", layout.data, "--json"]))
    alone = federation.evaluate(g, layout.data, held_out="validation")
    assert both["validation"]["accuracy"] == pytest.approx(alone["accuracy"])
    assert both["accuracy"] == pytest.approx(federation.evaluate(g, layout.data)["accuracy"])
    own = json.loads(ok(["evaluate", g, "--data", layout.data, "--validation-data", layout.data / "client-0.parquet",
                         "--json"]))
    assert own["validation"]["examples"] == len(pd.read_parquet(layout.data / "client-0.parquet"))
    assert own["accuracy"] == pytest.approx(both["accuracy"])  # the test split is the partition's all the same
    table = ok(["evaluate", g, "--data", layout.data])
    assert "validation" in table and "test" in table
    # A shard alone has no validation split: only the test row.
    shard = json.loads(ok(["evaluate", g, "--data", layout.data / "test.parquet", "--json"]))
    assert "validation" not in shard
    fails(["evaluate", g, "--data", layout.data, "--validation-data", tmp_path / "none.csv"], "not found")


def test_export_round_best_takes_the_round_with_the_best_validation_score(make_recipe, federation_copy, tmp_path):
    layout = federation_copy(make_recipe("ffa"))
    scores = {}
    for g in layout.global_checkpoints():
        r = int(g.name[6:])
        path = layout.metrics(r)
        if path.is_file():
            scores[r] = read_json(path, "round metrics")["validation"]["global"]["accuracy"]
    assert len(scores) >= 2
    # Make an earlier round the best on validation (and the last the best on test): best must follow validation.
    first, last = min(scores), max(scores)
    for r, value in ((first, 0.99), (last, 0.01)):
        metrics = read_json(layout.metrics(r), "round metrics")
        metrics["validation"]["global"]["accuracy"] = value
        metrics["global"]["accuracy"] = 1.0 - value
        metrics["validation"].setdefault("personalised", {})["client-1"] = {"accuracy": 1.0 - value}  # best: the last
        layout.metrics(r).write_text(json.dumps(metrics))
    chosen = choose_round(layout.root, "best")
    assert (chosen.round, chosen.score, chosen.metric) == (first, 0.99, "accuracy")
    # A state folder alone says whose personalised model to follow: the client it belongs to.
    assert choose_round(layout.root, "best", state_dir=layout.state("client-1")).round == last
    assert choose_round(layout.root, "best", state_dir=tmp_path / "no-state").round == first
    out = json.loads(ok(["export", layout.root, "--round", "best", "--out", tmp_path / "best", "--json"]))
    assert out["round"] == first
    assert json.loads(ok(["export", layout.global_checkpoint(first), "--round", "last", "--out", tmp_path / "last",
                          "--json"]))["round"] == last
    for args, needle in (
        ([layout.root, "--round", "seventh"], "--round must be 'best', 'last' or a round number"),
        ([layout.root, "--round", "99"], "has no global checkpoint of round 99"),
        ([tmp_path, "--round", "best"], "--round needs a run folder"),
    ):
        fails(["export", *args, "--out", tmp_path / "x"], needle)
    for r in scores:  # no validation scores anywhere (a partition without a validation split)
        metrics = read_json(layout.metrics(r), "round metrics")
        metrics.pop("validation")
        layout.metrics(r).write_text(json.dumps(metrics))
    fails(["export", layout.root, "--round", "best", "--out", tmp_path / "x"], "has a validation score")
    assert not (tmp_path / "x").exists()
