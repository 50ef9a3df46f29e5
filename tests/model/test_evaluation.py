"""fedlora_cli.model.evaluation: the metrics of each task: the answer extractor, exact match, deterministic causal-lm
evaluation, and the accuracy on a client's label mix."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import PAIRS, make_math

from fedlora_cli.data import partition
from fedlora_cli.data.examples import read_examples
from fedlora_cli.model import evaluation
from fedlora_cli.model.workbench import build


@pytest.mark.parametrize(
    "text, expected",
    [
        ("#### 42", "42"),
        ("Janet has 3 + 4 = 7 eggs.\n#### 7", "7"),
        ("12 + 30 = 42\n#### 42\nThanks for asking! 9", "42"),
        ("The answer is 42.", "42"),
        ("So the answer is: 42 apples, not 7.", "42"),
        ("Answer: -17", "-17"),
        ("It costs $1,234 in total.", "1234"),
        ("He pays $1,234.50.", "1234.5"),
        ("The temperature drops to -3.5 degrees.", "-3.5"),
        ("Therefore the result is \\boxed{42}.", "42"),
        ("\\boxed{1,000} and then 5", "1000"),
        ("First 3 apples, then 5 more, so 8 in all", "8"),
        ("x = 3.0", "3"),
        ("42.00", "42"),
        ("No number here.", None),
        ("", None),
    ],
)
def test_extract_number(text, expected):
    assert evaluation.extract_number(text) == expected


def test_extractor_matches_the_gsm_solutions_the_dataset_command_writes():
    frame = make_math(20, seed=5)
    for response, answer in zip(frame["response"], frame["answer"]):
        assert evaluation.extract_number(response) == evaluation.canonical_number(answer)


def test_evaluation_is_deterministic_and_reports_causal_metrics(make_causal_recipe, math_jsonl, tmp_path):
    r = make_causal_recipe()
    out = tmp_path / "data"
    partition.partition(r.data, 3, out, task="causal-lm")
    test = read_examples(out / partition.TEST_SHARD, r.data, "causal-lm", None)
    bench = build(r, None)
    first = evaluation.evaluate(bench, test)
    second = evaluation.evaluate(build(r, None), test)
    assert first == second
    assert first["examples"] == len(test) and first["generated"] == 10 and first["scored"] == 10
    assert first["perplexity"] == pytest.approx(np.exp(first["loss"]))
    # exact_match is the share of the first 10 test prompts (generate_examples) whose greedy generation ends in the
    # gold answer, computed here from the generations themselves.
    generations = evaluation.generate(bench, test, np.arange(10), r.evaluation.max_new_tokens)
    gold = [evaluation.canonical_number(test.answers[i].strip()) for i in range(10)]
    by_hand = sum(evaluation.extract_number(g.text) == a for g, a in zip(generations, gold)) / 10
    assert first["exact_match"] == by_hand and first["response_tokens"] > 0
    a = evaluation.generate(bench, test, np.arange(6), 8)
    b = evaluation.generate(bench, test, np.arange(6), 8)
    assert [g.tokens for g in a] == [g.tokens for g in b]
    assert all(len(g.tokens) <= 8 for g in a)


def test_exact_match_counts_generations_whose_final_number_is_the_gold_answer(make_causal_recipe, monkeypatch):
    bench = build(make_causal_recipe(), None)
    canned = {"7": "3 + 4 = 7 so #### 7", "24": "The answer is 25."}

    def fake_generate(bench, examples, rows, max_new_tokens, progress=None):
        return [evaluation.Generation([], canned[examples.answers[i]], False) for i in rows]

    monkeypatch.setattr(evaluation, "generate", fake_generate)
    metrics = evaluation.evaluate(bench, PAIRS)
    assert metrics["exact_match"] == 0.5 and metrics["scored"] == 2


def test_answer_none_skips_generation(make_causal_recipe):
    bench = build(make_causal_recipe(sections={"evaluation": {"answer": "none"}}), None)
    metrics = evaluation.evaluate(bench, PAIRS)
    assert metrics["exact_match"] is None and metrics["generated"] == 0 and metrics["loss"] > 0


def test_accuracy_on_mix_by_hand():
    from fedlora_cli.model.evaluation import accuracy_on_mix

    assert accuracy_on_mix([1.0, 0.5], [30, 10]) == pytest.approx(0.875)
    assert accuracy_on_mix([None, 0.5], [0, 10]) == pytest.approx(0.5)  # a class the client lacks is not needed
    assert accuracy_on_mix([None, 0.5], [3, 10]) is None  # ...but one it holds must be in the test split
