"""fedlora evaluate --lm-eval: lm-evaluation-harness scores of a causal federation's global or personalised model, in
the table, in --json and in the trackers; and every mistake with it one error line."""

from __future__ import annotations

import json

import pytest
from cli.helpers import fails, ok
from model.harness_tasks import write_tasks
from tracking.helpers import mlflow_history, tensorboard_scalars

from fedlora_cli import federation
from fedlora_cli.model import harness

pytest.importorskip("lm_eval")


@pytest.fixture
def fedsa_recipe(make_causal_recipe):
    """The tiny causal FedSA-LoRA federation tests/model/test_harness.py scores too (one cached run for both)."""
    return make_causal_recipe("fedsa", sections={"federation": {"rounds": 1}})


def test_evaluate_prints_lm_eval_scores_in_json_and_in_a_table(fedsa_recipe, cached_federation, tmp_path):
    layout = cached_federation(fedsa_recipe)
    tasks = write_tasks(tmp_path / "tasks")
    g = layout.global_checkpoint(1)
    printed = json.loads(ok(["evaluate", g, "--lm-eval", "tiny_mc", "--lm-eval", "tiny_text",
                             "--lm-eval-include", tasks, "--json"]))
    expected = federation.evaluate(g, lm_eval=harness.Request.of(["tiny_mc", "tiny_text"], [tasks]))
    assert printed == json.loads(json.dumps(expected))
    assert set(printed) == {"round", "personalised", "task", "lm_eval", "site"}  # no --data, no recipe metrics

    table = ok(["evaluate", g, "--data", layout.data, "--lm-eval", "tiny_mc", "--lm-eval-include", tasks])
    acc = printed["lm_eval"]["tasks"]["tiny_mc"]["metrics"]["acc_norm"]
    assert "perplexity" in table  # the recipe's metrics on --data ...
    # ... and lm-eval's
    assert "lm-eval 0.4.13 scores of the global model" in table and "acc_norm" in table and f"{acc:.4f}" in table
    assert "ran on:" in table


def test_a_personalised_evaluation_logs_lm_eval_scores_in_the_clients_run(fedsa_recipe, federation_copy, tmp_path):
    layout = federation_copy(fedsa_recipe)
    tasks = write_tasks(tmp_path / "tasks")
    state = layout.state("client-2")
    printed = json.loads(ok(["evaluate", layout.global_checkpoint(1), "--state", state, "--lm-eval", "tiny_text",
                             "--lm-eval-include", tasks, "--report-to", "tensorboard,mlflow", "--json"]))
    assert printed["personalised"] is True
    value = printed["lm_eval"]["tasks"]["tiny_text"]["metrics"]["bits_per_byte"]
    key = "round/personalised_lm_eval/tiny_text/bits_per_byte"
    scalars = tensorboard_scalars(state / "tracking" / "tensorboard" / fedsa_recipe.name / "client-2")
    assert scalars[key] == [(1, pytest.approx(value, rel=1e-6))]
    assert mlflow_history(state / "tracking" / "mlflow", fedsa_recipe.name)[key] == [(1, pytest.approx(value))]


def test_lm_eval_mistakes_are_one_error_line(fedsa_recipe, make_recipe, cached_federation, tmp_path, monkeypatch):
    g = cached_federation(fedsa_recipe).global_checkpoint(1)
    tasks = write_tasks(tmp_path / "tasks")
    fails(["evaluate", g], "nothing to evaluate on: give --data (test data), --lm-eval (lm-eval tasks) or both")
    fails(["evaluate", g, "--data", "x.csv", "--lm-eval-limit", "3"], "--lm-eval-limit goes with --lm-eval")
    fails(["evaluate", g, "--data", "x.csv", "--lm-eval-chat-template"], "--lm-eval-chat-template goes with --lm-eval")
    fails(["evaluate", g, "--lm-eval", "tiny_mc", "--lm-eval-include", tmp_path / "nowhere"],
          "--lm-eval-include: no folder")
    fails(["evaluate", g, "--lm-eval", "tiny_mc", "--lm-eval-include", tasks, "--lm-eval-limit", "0"],
          "--lm-eval-limit must be at least 1")
    fails(["evaluate", g, "--lm-eval", "tiny_mcq", "--lm-eval-include", tasks], "lm-eval task 'tiny_mcq' not found")
    classifier = cached_federation(make_recipe("fedavg")).global_checkpoint(2)
    fails(["evaluate", classifier, "--lm-eval", "tiny_mc", "--lm-eval-include", tasks],
          "--lm-eval scores a causal-lm federation")
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as without the extra
    fails(["evaluate", g, "--lm-eval", "tiny_mc"], "pip install 'fedlora[lmeval]'")
