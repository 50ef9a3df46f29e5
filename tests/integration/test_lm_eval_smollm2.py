"""lm-eval on the real SmolLM2 (what ``fedlora evaluate --lm-eval`` runs; tests/cli/test_lm_eval.py runs the command
itself on the tiny Llama): a global checkpoint of the shipped recipe scored by lm-eval on a local multiple-choice task
(a YAML and a JSONL written here), and the same scores computed by hand from the model's log-likelihood of every
choice."""

from __future__ import annotations

from pathlib import Path

import pytest
from model.harness_tasks import hand_scores, write_tasks

from fedlora_cli import federation, recipe as recipes
from fedlora_cli.model import harness
from fedlora_cli.model.workbench import build
from fedlora_cli.recipe import catalog as recipes_catalog

from .conftest import needs_smollm2

pytestmark = [pytest.mark.integration, needs_smollm2]
pytest.importorskip("lm_eval")

# General knowledge a 135M instruct model mostly has; the correct choice moves around.
QUESTIONS = [
    ("What is the capital of France?", ["London", "Paris", "Berlin"], 1),
    ("How many legs does a spider have?", ["eight", "six", "four"], 0),
    ("What colour is the sky on a clear day?", ["green", "red", "blue"], 2),
    ("Which animal says moo?", ["a dog", "a cow", "a cat"], 1),
    ("What is two plus two?", ["four", "three", "five"], 0),
    ("Which planet do we live on?", ["Mars", "Venus", "Earth"], 2),
    ("What do bees make?", ["honey", "milk", "silk"], 0),
    ("What is frozen water called?", ["steam", "ice", "sand"], 1),
]


def test_lm_eval_scores_the_real_smollm2_as_computed_by_hand(smollm2: Path, tmp_path):
    recipe = recipes.load(recipes_catalog.find("ffa-smollm2-gsm"), {"model.base": str(smollm2)})
    bench = build(recipe, None)  # loaded once, for the checkpoint, lm-eval and the hand computation
    g = federation.init(recipe, tmp_path / "global" / "round-000", bench=bench)
    tasks = write_tasks(tmp_path / "tasks", QUESTIONS)
    scores = federation.evaluate(g, bench=bench, lm_eval=harness.Request.of(["tiny_mc"], [tasks]))
    scores = scores["lm_eval"]["tasks"]["tiny_mc"]

    bench, _ = federation.load_for_evaluation(g, bench=bench)
    expected = hand_scores(bench.model, bench.tokenizer, QUESTIONS)
    assert scores["samples"] == len(QUESTIONS)
    assert scores["metrics"] == pytest.approx(expected, rel=1e-4)
    # A real model, not a random one: it knows most of these (a random pick scores 1/3; it scores 0.75).
    assert expected["acc"] >= 0.5
