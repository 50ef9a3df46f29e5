"""fedlora_cli.adapters.kinds: the kinds' layers, and the kinds on the built PEFT model (rsLoRA's scale in the forward
pass, VeRA's roles and seeded projections)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import recipe_dict

from fedlora_cli import recipe as recipes
from fedlora_cli.adapters.kinds import adapter_kind
from fedlora_cli.adapters.methods import plan
from fedlora_cli.adapters.roles import ROLE_A, ROLE_B, ROLE_HEAD, ROLE_LAMBDA_B, ROLE_LAMBDA_D, ROLE_PROJECTION, role_of
from fedlora_cli.errors import FedloraError
from fedlora_cli.model.workbench import build


def roles(names) -> set[str]:
    return {role_of(n) for n in names}


def test_lora_layers_pairs_a_and_b():
    names = ["base_model.model.x.query.lora_A.weight", "base_model.model.x.query.lora_B.weight",
             "base_model.model.classifier.weight"]
    assert adapter_kind("lora").layers(names) == {"base_model.model.x.query": (names[0], names[1])}
    with pytest.raises(FedloraError, match="lacks"):
        adapter_kind("lora").layers(names[:1])
    # A kind without factors has no layers to pair (svd and exact refuse it up front).
    with pytest.raises(FedloraError, match="no A and B factors"):
        adapter_kind("vera").layers(names)


# rsLoRA on the built model ---------------------------------------------------------------------------------------


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


# VeRA on the built model -----------------------------------------------------------------------------------------


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
