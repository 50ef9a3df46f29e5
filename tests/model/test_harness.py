"""fedlora_cli.model.harness: lm-evaluation-harness on the tiny Llama, on task YAML files with local data made here.

The scores lm-eval reports are checked against the same quantities computed by hand with a plain forward pass of the
model the harness was given: the log-likelihood of each choice, and of each whole text (its bits per byte).
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from model.harness_tasks import (
    QUESTIONS, greedy, hand_bits_per_byte, hand_scores, write_generation_task, write_tasks,
)

from fedlora_cli import federation
from fedlora_cli.errors import FedloraError
from fedlora_cli.model import harness

pytest.importorskip("lm_eval")


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory) -> Path:
    return write_tasks(tmp_path_factory.mktemp("lm-eval-tasks"))


@pytest.fixture
def fedsa_run(make_causal_recipe, cached_federation):
    """A finished tiny causal federation under FedSA-LoRA: each client's B stays home, so its model is its own."""
    return cached_federation(make_causal_recipe("fedsa", sections={"federation": {"rounds": 1}}))


def test_lm_eval_scores_the_global_model_as_computed_by_hand(fedsa_run, tasks_dir):
    g = fedsa_run.global_checkpoint(1)
    states = (random.getstate(), np.random.get_state()[1].copy(), torch.random.get_rng_state())
    scores = federation.evaluate(g, lm_eval=harness.Request.of(["tiny_mc,tiny_text"], [tasks_dir]))
    assert scores["round"] == 1 and not scores["personalised"] and "examples" not in scores

    bench, _ = federation.load_for_evaluation(g)
    expected = hand_scores(bench.model, bench.tokenizer)
    mc, text = scores["lm_eval"]["tasks"]["tiny_mc"], scores["lm_eval"]["tasks"]["tiny_text"]
    assert mc["metrics"] == pytest.approx(expected, rel=1e-5)
    assert mc["samples"] == len(QUESTIONS) and mc["n_shot"] == 0
    # The standard error of a mean of 0/1 scores, as lm-eval computes it (the sample standard deviation / sqrt(n)).
    p, n = expected["acc_norm"], len(QUESTIONS)
    assert mc["stderr"]["acc_norm"] == pytest.approx(math.sqrt(p * (1 - p) / (n - 1)))
    assert text["metrics"]["bits_per_byte"] == pytest.approx(hand_bits_per_byte(bench.model, bench.tokenizer), rel=1e-5)
    # lm-eval's seeds were set for its run only: the process's generators are where they were.
    assert random.getstate() == states[0] and np.array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.random.get_rng_state(), states[2])


def test_a_personalised_model_is_scored_with_its_own_state(fedsa_run, tasks_dir):
    g, state = fedsa_run.global_checkpoint(1), fedsa_run.state("client-1")
    request = harness.Request.of([str(tasks_dir / "tiny_text.yaml")])  # a YAML file, no folder
    personal = federation.evaluate(g, state_dir=state, lm_eval=request)["lm_eval"]["tasks"]["tiny_text"]
    global_ = federation.evaluate(g, lm_eval=request)["lm_eval"]["tasks"]["tiny_text"]

    bench, _ = federation.load_for_evaluation(g, state, "client-1")
    expected = hand_bits_per_byte(bench.model, bench.tokenizer)
    assert personal["metrics"]["bits_per_byte"] == pytest.approx(expected, rel=1e-5)
    assert abs(global_["metrics"]["bits_per_byte"] - expected) > 1e-4, "the client's own B changes the model"


def test_test_data_and_lm_eval_tasks_are_scored_in_one_call(fedsa_run, tasks_dir):
    g = fedsa_run.global_checkpoint(1)
    alone = federation.evaluate(g, fedsa_run.data, lm_eval=None)
    both = federation.evaluate(g, fedsa_run.data, lm_eval=harness.Request.of(["tiny_mc"], [tasks_dir]))
    assert {k: v for k, v in both.items() if k != "lm_eval"} == alone
    assert set(both["lm_eval"]["tasks"]) == {"tiny_mc"}


def test_the_chat_template_puts_each_prompt_in_a_user_turn(fedsa_run, tasks_dir):
    g = fedsa_run.global_checkpoint(1)
    scores = federation.evaluate(g, lm_eval=harness.Request.of(["tiny_mc"], [tasks_dir], chat_template=True))
    bench, _ = federation.load_for_evaluation(g)
    expected = hand_scores(bench.model, bench.tokenizer, chat=True)
    assert scores["lm_eval"]["tasks"]["tiny_mc"]["metrics"] == pytest.approx(expected, rel=1e-5)
    assert scores["lm_eval"]["chat_template"] is True
    assert expected["brier_score"] != pytest.approx(hand_scores(bench.model, bench.tokenizer)["brier_score"], rel=1e-4)


def test_a_generation_task_scores_the_models_greedy_continuations(fedsa_run, tmp_path):
    bench, _ = federation.load_for_evaluation(fedsa_run.global_checkpoint(1))
    # A random B, so that the tiny model says different things to different prompts (with B = 0 it says ':::').
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in bench.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 2)
    questions = [q for q, _, _ in QUESTIONS[:4]]
    said = [greedy(bench.model, bench.tokenizer, f"Question: {q}\nAnswer:", 8) for q in questions]
    assert len(set(said)) > 1
    # The first two expected answers are what the model says, the last two are not: exact match 1/2, unless
    # lm-eval's generations (batched, left-padded, through generate) differ from these token by token ones.
    folder = write_generation_task(tmp_path, questions, said[:2] + [s + " never" for s in said[2:]], tokens=8)
    scores = harness.run(bench, harness.load(harness.Request.of(["tiny_gen"], [folder])))
    assert scores["tasks"]["tiny_gen"]["metrics"] == {"exact_match": 0.5}


def test_a_limit_and_a_fewshot_count_reach_lm_eval(fedsa_run, tasks_dir):
    scores = federation.evaluate(fedsa_run.global_checkpoint(1),
                                 lm_eval=harness.Request.of(["tiny_mc"], [tasks_dir], limit=2, num_fewshot=1))
    entry = scores["lm_eval"]["tasks"]["tiny_mc"]
    assert entry["samples"] == 2 and entry["n_shot"] == 1 and scores["lm_eval"]["limit"] == 2


def test_task_lists_are_split_on_commas_and_an_empty_one_is_refused():
    # An unknown name is looked for among lm-eval's ~15,000 tasks too: tests/cli/test_lm_eval.py checks its one line.
    assert harness.Request.of(["a,b", " c ", "a"]).tasks == ("a", "b", "c")
    with pytest.raises(FedloraError, match="--lm-eval names no task"):
        harness.Request.of([" , "])


def test_a_task_whose_data_cannot_be_read_names_the_task(tmp_path):
    write_tasks(tmp_path)
    (tmp_path / "tiny_mc.jsonl").unlink()
    with pytest.raises(FedloraError, match="lm-eval task 'tiny_mc': cannot load it"):
        harness.load(harness.Request.of(["tiny_mc"], [tmp_path]))


def test_a_glob_expands_over_the_indexed_tasks(tasks_dir):
    from lm_eval.tasks import TaskManager

    # Over the folder alone here: loading a glob indexes lm-eval's own tasks too, which takes seconds.
    folder = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    assert harness._expand(folder, "tiny_*") == ["tiny_mc", "tiny_text"]
    with pytest.raises(FedloraError, match=r"lm-eval task 'tiny_\*x' not found"):
        harness._expand(folder, "tiny_*x")


def test_lm_eval_refuses_a_classification_federation(make_recipe, cached_federation, tasks_dir):
    g = cached_federation(make_recipe("fedavg")).global_checkpoint(2)
    with pytest.raises(FedloraError, match="--lm-eval scores a causal-lm federation; this one is sequence-cl"):
        federation.evaluate(g, lm_eval=harness.Request.of(["tiny_mc"], [tasks_dir]))


def test_without_the_extra_the_error_says_what_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    with pytest.raises(FedloraError, match=r"pip install 'fedlora\[lmeval\]'"):
        harness.load(harness.Request.of(["tiny_mc"]))


def test_summary_names_filtered_metrics_and_keeps_groups_apart():
    results = {
        "results": {"gsm": {"alias": "gsm", "exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.1,
                            "exact_match,flexible-extract": 0.5, "exact_match_stderr,flexible-extract": "N/A"},
                    "suite": {"alias": "suite", "acc,none": 0.6, "acc_stderr,none": 0.05}},
        "groups": {"suite": {"alias": "suite", "acc,none": 0.6, "acc_stderr,none": 0.05}},
        "n-shot": {"gsm": 5}, "n-samples": {"gsm": {"original": 10, "effective": 4}},
    }
    out = harness.summary(results, harness.Request.of(["gsm", "suite"], limit=4))
    assert out["tasks"] == {"gsm": {
        "metrics": {"exact_match/strict-match": 0.25, "exact_match/flexible-extract": 0.5},
        "stderr": {"exact_match/strict-match": 0.1, "exact_match/flexible-extract": None},
        "samples": 4, "n_shot": 5,
    }}
    assert out["groups"]["suite"]["metrics"] == {"acc": 0.6} and out["limit"] == 4
