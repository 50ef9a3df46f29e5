"""fedlora_cli.adapters.kinds: each AdapterKind's scale, rank axes, layers, PEFT config and model-card line, and
the kinds on the built PEFT model (rsLoRA's scale in the forward pass, VeRA's roles and seeded projections)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import recipe_dict

from fedlora_cli import recipe as recipes
from fedlora_cli.adapters.kinds import ADAPTER_KINDS, LoRA, RsLoRA, VeRA, adapter_kind
from fedlora_cli.adapters.methods import plan
from fedlora_cli.adapters.roles import ROLE_A, ROLE_B, ROLE_HEAD, ROLE_LAMBDA_B, ROLE_LAMBDA_D, ROLE_PROJECTION, role_of
from fedlora_cli.errors import FedloraError
from fedlora_cli.model.workbench import build


def roles(names) -> set[str]:
    return {role_of(n) for n in names}


def adapter_section(**keys) -> recipes.AdapterSection:
    raw = {"model": {"base": "m"}, "adapter": keys}
    if keys.get("client_ranks"):
        raw["federation"] = {"aggregation": "svd"}
    return recipes.from_dict(raw).adapter


# The kind objects ------------------------------------------------------------------------------------------------


def test_the_registry_holds_each_kind_under_its_name():
    assert list(ADAPTER_KINDS) == ["lora", "rslora", "vera"]
    assert [type(k) for k in ADAPTER_KINDS.values()] == [LoRA, RsLoRA, VeRA]
    assert all(adapter_kind(name).name == name for name in ADAPTER_KINDS)
    assert [k.label for k in ADAPTER_KINDS.values()] == ["LoRA", "rsLoRA", "VeRA"]
    with pytest.raises(FedloraError, match="unknown adapter kind 'dora'.*lora, rslora, vera"):
        adapter_kind("dora")


@pytest.mark.parametrize(
    "kind, alpha, r, expected",
    [("lora", 16, 4, 4.0), ("lora", 8, 16, 0.5), ("rslora", 16, 4, 8.0), ("rslora", 8, 2, 8 / math.sqrt(2))],
)
def test_scale(kind, alpha, r, expected):
    assert adapter_kind(kind).scale(alpha, r) == pytest.approx(expected, rel=1e-15)


def test_vera_has_no_lora_scale():
    with pytest.raises(FedloraError, match="'vera' has no LoRA scale"):
        adapter_kind("vera").scale(16, 4)


@pytest.mark.parametrize("kind", ["lora", "rslora"])
def test_lora_rank_axes(kind):
    k = adapter_kind(kind)
    # A is (r x in): rank on axis 0; B is (out x r): rank on axis 1; the head does not follow the rank.
    assert k.rank_axis(ROLE_A) == 0
    assert k.rank_axis(ROLE_B) == 1
    assert k.rank_axis(ROLE_HEAD) is None
    assert k.has_factors and k.side_a == ROLE_A and k.side_b == ROLE_B
    assert k.roles == {ROLE_A, ROLE_B, ROLE_HEAD} and k.per_example_gradients


def test_vera_sides_roles_and_rank_axes():
    k = adapter_kind("vera")
    assert (k.side_a, k.side_b) == (ROLE_LAMBDA_D, ROLE_LAMBDA_B)
    assert k.roles == {ROLE_LAMBDA_D, ROLE_LAMBDA_B, ROLE_PROJECTION, ROLE_HEAD}
    assert k.fixed == {ROLE_PROJECTION}
    assert not k.has_factors and not k.per_example_gradients
    # lambda_b has the layer's output width, the projections their own shape: no client-rank reshaping.
    assert k.rank_axis(ROLE_LAMBDA_B) is None and k.rank_axis(ROLE_PROJECTION) is None
    assert k.rank_axis(ROLE_HEAD) is None


def test_lora_peft_config():
    a = adapter_section(r=8, alpha=16, dropout=0.1, target_modules=["q_proj", "v_proj"])
    config = adapter_kind("lora").peft_config(a, 2, "SEQ_CLS", seed=5)
    assert type(config).__name__ == "LoraConfig"
    assert config.r == 2  # the rank asked for (a client's), not adapter.r
    assert config.lora_alpha == 16 and config.lora_dropout == 0.1
    assert set(config.target_modules) == {"q_proj", "v_proj"} and config.task_type == "SEQ_CLS"
    assert config.use_rslora is False
    assert adapter_kind("rslora").peft_config(a, 2, "CAUSAL_LM", seed=5).use_rslora is True


def test_vera_peft_config_is_seeded_and_saves_its_projections():
    a = adapter_section(kind="vera", r=16, dropout=0.05, vera_d_initial=0.3)
    config = adapter_kind("vera").peft_config(a, 16, "SEQ_CLS", seed=7)
    assert type(config).__name__ == "VeraConfig"
    assert config.r == 16 and config.projection_prng_key == 7 and config.save_projection is True
    assert config.d_initial == 0.3 and config.vera_dropout == 0.05 and config.task_type == "SEQ_CLS"
    assert set(config.target_modules) == {"query", "value"}


def test_describe_for_the_model_card():
    plain = adapter_section(r=4, alpha=8, dropout=0.0).__dict__
    assert adapter_kind("lora").describe(plain) == "LoRA r=4, alpha=8.0, dropout=0.00, target modules query, value"
    hetero = adapter_section(r=4, client_ranks={"client-0": 2, "client-3": 1}).__dict__
    assert adapter_kind("rslora").describe(hetero) == (
        "rsLoRA r=4 (client ranks client-0: 2, client-3: 1), alpha=16.0, dropout=0.05, target modules query, value"
    )
    # VeRA has no alpha: its line leaves it out.
    vera = adapter_section(kind="vera", r=16, dropout=0.1).__dict__
    assert adapter_kind("vera").describe(vera) == "VeRA r=16, dropout=0.10, target modules query, value"


def test_lora_layers_pairs_a_and_b():
    names = ["base_model.model.x.query.lora_A.weight", "base_model.model.x.query.lora_B.weight",
             "base_model.model.classifier.weight"]
    assert adapter_kind("lora").layers(names) == {"base_model.model.x.query": (names[0], names[1])}
    with pytest.raises(FedloraError, match="lacks"):
        adapter_kind("lora").layers(names[:1])
    # A kind without factors has no layers to pair (svd and exact refuse it up front).
    with pytest.raises(FedloraError, match="no A and B factors"):
        adapter_kind("vera").layers(names)


def test_layers_are_sorted_and_skip_other_roles():
    names = [
        "base_model.model.l1.value.lora_B.default.weight", "base_model.model.l0.query.lora_A.default.weight",
        "base_model.model.l1.value.lora_A.default.weight", "base_model.model.l0.query.lora_B.default.weight",
        "base_model.model.classifier.modules_to_save.default.bias",
    ]
    layers = adapter_kind("rslora").layers(names)
    assert list(layers) == ["base_model.model.l0.query", "base_model.model.l1.value"]
    assert layers["base_model.model.l1.value"] == (names[2], names[0])
    with pytest.raises(FedloraError, match="'base_model.model.l1.value' lacks"):
        adapter_kind("lora").layers(names[1:])


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
