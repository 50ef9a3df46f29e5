"""Adapter kinds on the built PEFT model and in tiny federations: rsLoRA's scale, VeRA's roles and invariants.

FedSA-VeRA: lambda_d travels, lambda_b never does. FFA-VeRA: lambda_d stays bit-identical. VeRA's projections
are never sent, identical for every client, and saved with the global checkpoint so vanilla PEFT loads it.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import recipe_dict
from safetensors.torch import load_file

from fedlora_cli import federation, recipe as recipes, storage
from fedlora_cli.adapters.kinds import adapter_kind
from fedlora_cli.adapters.methods import plan
from fedlora_cli.adapters.roles import ROLE_A, ROLE_B, ROLE_HEAD, ROLE_LAMBDA_B, ROLE_LAMBDA_D, ROLE_PROJECTION, role_of
from fedlora_cli.errors import FedloraError
from fedlora_cli.model.workbench import build

CLIENTS = ["client-0", "client-1", "client-2"]


@pytest.fixture
def kind_recipe(tiny_model_dir, reviews_csv):
    def make(kind: str, method: str = "fedavg", head: str = "shared", **adapter):
        raw = recipe_dict(tiny_model_dir, reviews_csv, method, head)
        raw["adapter"].update({"kind": kind, **adapter})
        return recipes.from_dict(raw)

    return make


def roles(names) -> set[str]:
    return {role_of(n) for n in names}


def sent_tensors(layout, round_: int, client: str) -> dict[str, torch.Tensor]:
    return load_file(str(layout.update(round_, client) / storage.UPDATE_TENSORS))


def global_tensors(layout, round_: int) -> dict[str, torch.Tensor]:
    return load_file(str(layout.global_checkpoint(round_) / storage.ADAPTER_WEIGHTS))


# rsLoRA ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, expected", [("lora", 8 / 4), ("rslora", 8 / math.sqrt(4))])
def test_lora_scale_is_what_the_recipe_says(kind, expected, kind_recipe):
    recipe = kind_recipe(kind, r=4, alpha=8)
    bench = build(recipe, num_labels=2)

    scalings = [m.scaling["default"] for _, m in bench.model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "scaling")]

    assert len(scalings) == 4  # query and value in 2 layers
    assert scalings == pytest.approx([expected] * 4)
    assert bench.adapter_config()["use_rslora"] is (kind == "rslora")
    # The scale really multiplies B A in the forward pass, not just an attribute.
    layer = next(m for _, m in bench.model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "scaling"))
    with torch.no_grad():
        layer.lora_B["default"].weight.fill_(0.01)
        x = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
        lora = layer.lora_B["default"](layer.lora_A["default"](x))
        torch.testing.assert_close(layer(x) - layer.get_base_layer()(x), expected * lora)


# VeRA roles ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method, trained, sent",
    [
        ("fedavg", {ROLE_LAMBDA_D, ROLE_LAMBDA_B}, {ROLE_LAMBDA_D, ROLE_LAMBDA_B}),
        ("ffa", {ROLE_LAMBDA_B}, {ROLE_LAMBDA_B}),
        ("fedsa", {ROLE_LAMBDA_D, ROLE_LAMBDA_B}, {ROLE_LAMBDA_D}),
    ],
)
def test_vera_roles_on_the_built_model(method, trained, sent, kind_recipe):
    recipe = kind_recipe("vera", method, head="local", r=16)
    bench = build(recipe, num_labels=2)
    p = plan(method, "local", "vera")

    params = bench.set_trainable(p)
    trainable = [n for n, t in bench.model.named_parameters() if t.requires_grad]

    assert len(params) == len(trainable)
    assert roles(trainable) == trained | {ROLE_HEAD}
    assert p.sent == sent and p.local == (trained - sent) | {ROLE_HEAD}
    assert p.frozen == {ROLE_PROJECTION, ROLE_LAMBDA_D, ROLE_LAMBDA_B} - trained
    tensors = bench.adapter_tensors()
    assert roles(tensors) == {ROLE_LAMBDA_D, ROLE_LAMBDA_B, ROLE_PROJECTION, ROLE_HEAD}
    assert not roles(tensors) & {ROLE_A, ROLE_B}
    # PEFT's VeRA init: lambda_b zero (no change to the base model at round 0), lambda_d = d_initial.
    for name, t in tensors.items():
        if role_of(name) == ROLE_LAMBDA_B:
            assert float(t.abs().sum()) == 0
        if role_of(name) == ROLE_LAMBDA_D:
            assert torch.equal(t, torch.full_like(t, recipe.adapter.vera_d_initial))
    config = bench.adapter_config()
    assert config["peft_type"] == "VERA" and config["r"] == 16
    assert config["save_projection"] is True and config["projection_prng_key"] == recipe.training.seed
    # The projections are buffers, never parameters: nothing can train them.
    assert not any(role_of(n) == ROLE_PROJECTION for n, _ in bench.model.named_parameters())


def test_vera_projections_follow_the_seed(kind_recipe, tiny_model_dir, reviews_csv):
    a = build(kind_recipe("vera", r=16), 2).adapter_tensors()
    b = build(kind_recipe("vera", r=16), 2).adapter_tensors()
    raw = recipe_dict(tiny_model_dir, reviews_csv)
    raw["adapter"].update({"kind": "vera", "r": 16})
    raw["training"]["seed"] = 1
    c = build(recipes.from_dict(raw), 2).adapter_tensors()
    names = [n for n in a if role_of(n) == ROLE_PROJECTION]
    assert len(names) == 2
    assert all(torch.equal(a[n], b[n]) for n in names)
    assert not any(torch.equal(a[n], c[n]) for n in names)


def test_ffa_vera_local_training_leaves_lambda_d_bit_identical(kind_recipe, partition_dir):
    from fedlora_cli.data.examples import read_shard
    from fedlora_cli.model.training import local_train

    recipe = kind_recipe("vera", "ffa", r=16)
    bench = build(recipe, num_labels=2)
    before = bench.adapter_tensors()
    examples = read_shard(partition_dir / "client-0.parquet", "text", "sentiment", 2)

    local_train(bench, plan("ffa", "shared", "vera"), examples, seed=0)

    after = bench.adapter_tensors()
    for name, t in before.items():
        if role_of(name) in (ROLE_LAMBDA_D, ROLE_PROJECTION):
            assert torch.equal(after[name], t), f"{name} changed"
    assert any(not torch.equal(after[n], t) for n, t in before.items() if role_of(n) == ROLE_LAMBDA_B)


# VeRA in federations -----------------------------------------------------------------------------------------


def test_fedsa_vera_never_sends_lambda_b(kind_recipe, run_federation):
    layout = run_federation(kind_recipe("vera", "fedsa", r=16))
    for round_ in (1, 2):
        for client in CLIENTS:
            sent = sent_tensors(layout, round_, client)
            assert ROLE_LAMBDA_D in roles(sent)
            assert not roles(sent) & {ROLE_LAMBDA_B, ROLE_PROJECTION}
    kept = {c: storage.latest_state(layout.state(c), before_round=3).tensors() for c in CLIENTS}
    assert all(roles(k) == {ROLE_LAMBDA_B} for k in kept.values())
    name = next(iter(kept["client-0"]))
    assert not torch.equal(kept["client-0"][name], kept["client-1"][name])
    # lambda_d is averaged; the global's lambda_b is still the zero init.
    g0, g2 = global_tensors(layout, 0), global_tensors(layout, 2)
    assert any(not torch.equal(g2[n], g0[n]) for n in g0 if role_of(n) == ROLE_LAMBDA_D)
    assert all(float(g2[n].abs().sum()) == 0 for n in g0 if role_of(n) == ROLE_LAMBDA_B)


def test_ffa_vera_keeps_lambda_d_and_projections_bit_identical(kind_recipe, run_federation):
    layout = run_federation(kind_recipe("vera", "ffa", r=16))
    g0 = global_tensors(layout, 0)
    frozen = {n: t for n, t in g0.items() if role_of(n) in (ROLE_LAMBDA_D, ROLE_PROJECTION)}
    assert roles(frozen) == {ROLE_LAMBDA_D, ROLE_PROJECTION}
    for round_ in (1, 2):
        g = global_tensors(layout, round_)
        assert all(torch.equal(g[n], t) for n, t in frozen.items())
        for client in CLIENTS:
            assert roles(sent_tensors(layout, round_, client)) == {ROLE_LAMBDA_B, ROLE_HEAD}
    assert any(float(t.abs().sum()) > 0 for n, t in global_tensors(layout, 2).items() if role_of(n) == ROLE_LAMBDA_B)
    m0 = storage.read_global(layout.global_checkpoint(0)).manifest
    assert m0.frozen_digest == storage.read_global(layout.global_checkpoint(2)).manifest.frozen_digest


def test_vera_update_is_much_smaller_than_lora(kind_recipe, run_federation):
    vera = run_federation(kind_recipe("vera", "fedavg", r=16), "vera")
    lora = run_federation(kind_recipe("lora", "fedavg", r=4), "lora")
    size = lambda layout: storage.read_update(layout.update(1, "client-0")).manifest.bytes
    assert size(vera) < size(lora) / 2


@pytest.mark.parametrize("kind", ["vera", "rslora"])
def test_global_checkpoint_of_a_kind_loads_in_vanilla_peft(kind, kind_recipe, run_federation, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    layout = run_federation(kind_recipe(kind, "fedavg", r=16 if kind == "vera" else 4))
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


def test_lora_layers_pairs_a_and_b():
    names = ["base_model.model.x.query.lora_A.weight", "base_model.model.x.query.lora_B.weight",
             "base_model.model.classifier.weight"]
    assert adapter_kind("lora").layers(names) == {"base_model.model.x.query": (names[0], names[1])}
    with pytest.raises(FedloraError, match="lacks"):
        adapter_kind("lora").layers(names[:1])
    # A kind without factors has no layers to pair (svd and exact refuse it up front).
    with pytest.raises(FedloraError, match="no A and B factors"):
        adapter_kind("vera").layers(names)
