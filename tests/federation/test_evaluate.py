"""fedlora_cli.federation.evaluate: the global model and each client's personalised model as evaluation loads them:
the same logits as vanilla PEFT, each client's own B, and exact aggregation's base-weight correction."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from fedlora_cli import federation, storage
from fedlora_cli.adapters.kinds import adapter_kind
from fedlora_cli.cli import app

CLIENTS = ["client-0", "client-1", "client-2"]


ALPHA, RANK = 8.0, 4  # conftest's adapter: r = 4, alpha = 8


runner = CliRunner()


def weights_of(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / storage.ADAPTER_WEIGHTS))


def products(tensors: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """layer -> scale * B A, in float64."""
    return {layer: scale * (tensors[b].double() @ tensors[a].double())
            for layer, (a, b) in adapter_kind("lora").layers(tensors).items()}


def test_personalised_evaluation_uses_the_clients_b(make_recipe, cached_federation):
    layout = cached_federation(make_recipe("fedsa"))
    g = layout.global_checkpoint(2)
    test = layout.data
    global_metrics = federation.evaluate(g, test)
    per_client = [federation.evaluate(g, test, state_dir=layout.state(c), client_id=c) for c in CLIENTS]
    losses = {round(m["loss"], 6) for m in per_client}
    assert len(losses) == 3, "each client's personalised model is different"
    assert all(m["personalised"] for m in per_client) and not global_metrics["personalised"]
    # Loading the same tensors by hand gives the same model.
    bench, _ = federation.load_for_evaluation(g, layout.state("client-1"), "client-1")
    kept = load_file(str(layout.state("client-1") / "round-002" / storage.STATE_TENSORS))
    current = bench.adapter_tensors()
    assert all(torch.equal(current[n], t) for n, t in kept.items())


def test_global_checkpoint_loads_in_vanilla_peft(make_recipe, cached_federation, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    layout = cached_federation(make_recipe("fedavg"))
    g = layout.global_checkpoint(2)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    model = PeftModel.from_pretrained(base, str(g))
    model.eval()
    bench, _ = federation.load_for_evaluation(g)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    batch = tok(["the movie was good", "awful boring film"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, bench.model(**batch).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["vera", "rslora"])
def test_global_checkpoint_of_a_kind_loads_in_vanilla_peft(kind, kind_recipe, cached_federation, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    layout = cached_federation(kind_recipe(kind, "fedavg", r=16 if kind == "vera" else 4))
    g = layout.global_checkpoint(2)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    model = PeftModel.from_pretrained(base, str(g)).eval()
    bench, _ = federation.load_for_evaluation(g)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    batch = tok(["the movie was good", "awful boring film"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, bench.model(**batch).logits, rtol=0, atol=1e-6)
    # The adapter really is in use: the logits differ from the base model's.
    plain = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2).eval()
    with torch.no_grad():
        assert not torch.allclose(plain(**batch).logits, model(**batch).logits)


def test_exact_correction_is_in_the_model_clients_and_evaluation_use(strategy_recipe, cached_federation, tiny_model_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from fedlora_cli import export

    layout = cached_federation(strategy_recipe(aggregation="exact"))
    g = layout.global_checkpoint(2)
    correction = storage.read_global(g).correction()
    bench, _ = federation.load_for_evaluation(g)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    base_weights = dict(base.named_parameters())
    for layer, c in correction.items():
        module = bench.model.get_submodule(layer)
        w0 = base_weights[layer.removeprefix("base_model.model.") + ".weight"]
        torch.testing.assert_close(module.get_base_layer().weight, w0 + c)
    # A merged export holds W0 + correction + s B A; an adapter export cannot hold the correction.
    result = export.export(g, tmp_path / "merged", merge=True)
    merged = dict(AutoModelForSequenceClassification.from_pretrained(result.path).named_parameters())
    effective = products(weights_of(g), ALPHA / RANK)
    for layer, c in correction.items():
        key = layer.removeprefix("base_model.model.") + ".weight"
        torch.testing.assert_close(merged[key].double(), base_weights[key].double() + c.double() + effective[layer],
                                   rtol=1e-5, atol=1e-5)
    out = runner.invoke(app, ["export", str(g), "--out", str(tmp_path / "adapter")])
    assert out.exit_code == 1 and "--merge" in out.output and not (tmp_path / "adapter").exists()
