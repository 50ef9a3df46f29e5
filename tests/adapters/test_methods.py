"""fedlora_cli.adapters.methods: the method table of methods.md, role by role; Method objects and Plan."""

from __future__ import annotations

import pytest

from fedlora_cli.adapters.methods import HEAD_POLICIES, METHODS, method, plan
from fedlora_cli.adapters.roles import (
    ROLE_A, ROLE_B, ROLE_HEAD, ROLE_LAMBDA_B, ROLE_LAMBDA_D, ROLE_PROJECTION, SIDE_A, SIDE_B, role_of,
)
from fedlora_cli.errors import FedloraError


@pytest.mark.parametrize(
    "method, head, trained, sent, local",
    [
        ("fedavg", "shared", {ROLE_A, ROLE_B, ROLE_HEAD}, {ROLE_A, ROLE_B, ROLE_HEAD}, set()),
        ("ffa", "shared", {ROLE_B, ROLE_HEAD}, {ROLE_B, ROLE_HEAD}, set()),
        ("fedsa", "shared", {ROLE_A, ROLE_B, ROLE_HEAD}, {ROLE_A, ROLE_HEAD}, {ROLE_B}),
        ("fedsa", "local", {ROLE_A, ROLE_B, ROLE_HEAD}, {ROLE_A}, {ROLE_B, ROLE_HEAD}),
        ("ffa", "frozen", {ROLE_B}, {ROLE_B}, set()),
        ("fedavg", "local", {ROLE_A, ROLE_B, ROLE_HEAD}, {ROLE_A, ROLE_B}, {ROLE_HEAD}),
    ],
)
def test_plan(method, head, trained, sent, local):
    p = plan(method, head)
    assert p.trained == trained
    assert p.sent == sent
    assert p.local == local
    assert p.frozen == {ROLE_A, ROLE_B, ROLE_HEAD} - trained


@pytest.mark.parametrize(
    "method, head, trained, sent, local, frozen",
    [
        ("fedavg", "shared", {"vera_lambda_d", "vera_lambda_b", ROLE_HEAD}, {"vera_lambda_d", "vera_lambda_b", ROLE_HEAD},
         set(), {"vera_projection"}),
        ("ffa", "shared", {"vera_lambda_b", ROLE_HEAD}, {"vera_lambda_b", ROLE_HEAD}, set(),
         {"vera_lambda_d", "vera_projection"}),
        ("fedsa", "local", {"vera_lambda_d", "vera_lambda_b", ROLE_HEAD}, {"vera_lambda_d"},
         {"vera_lambda_b", ROLE_HEAD}, {"vera_projection"}),
    ],
)
def test_vera_plan(method, head, trained, sent, local, frozen):
    p = plan(method, head, "vera")
    assert (p.trained, p.sent, p.local, p.frozen) == (trained, sent, local, frozen)


def test_rslora_plan_is_lora_plan_and_scales_differ():
    from fedlora_cli.adapters.kinds import adapter_kind

    assert plan("fedsa", "local", "rslora").sent == plan("fedsa", "local", "lora").sent == {ROLE_A}
    assert adapter_kind("lora").scale(16, 4) == 4.0
    assert adapter_kind("rslora").scale(16, 4) == 8.0


# Method objects ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, label, trains, sends, both, paper",
    [
        ("fedavg", "FedAvg-LoRA", {SIDE_A, SIDE_B}, {SIDE_A, SIDE_B}, True, "FedIT"),
        ("ffa", "FFA-LoRA", {SIDE_B}, {SIDE_B}, False, "arXiv 2403.12313"),
        ("fedsa", "FedSA-LoRA", {SIDE_A, SIDE_B}, {SIDE_A}, False, "arXiv 2410.01463"),
    ],
)
def test_method_labels_sides_and_factors(name, label, trains, sends, both, paper):
    m = method(name)
    assert m is METHODS[name] and m.name == name
    assert m.label == label
    assert (m.trains, m.sends) == (trains, sends)
    # svd and exact need both factors of every client: only FedAvg-LoRA sends them.
    assert m.sends_both_factors is both
    assert paper in m.explanation
    assert m.summary.startswith(label + ":")


def test_only_fedavg_sends_both_factors():
    assert [name for name, m in METHODS.items() if m.sends_both_factors] == ["fedavg"]


def test_unknown_method_and_head_policy_are_named():
    with pytest.raises(FedloraError, match="unknown method 'fedprox'.*fedavg, ffa, fedsa"):
        method("fedprox")
    with pytest.raises(FedloraError, match="unknown head policy 'tied'.*shared, local, frozen"):
        plan("fedavg", "tied")
    assert set(HEAD_POLICIES) == {"shared", "local", "frozen"}


def test_plan_answers_by_tensor_name():
    p = plan("fedsa", "local")
    a = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"
    b = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight"
    head = "base_model.model.classifier.modules_to_save.default.weight"
    assert (p.trains(a), p.sends(a), p.keeps(a)) == (True, True, False)
    assert (p.trains(b), p.sends(b), p.keeps(b)) == (True, False, True)
    assert (p.trains(head), p.sends(head), p.keeps(head)) == (True, False, True)
    frozen = plan("ffa", "frozen")
    assert (frozen.trains(a), frozen.sends(a), frozen.keeps(a)) == (False, False, False)
    assert not frozen.trains(head) and role_of(head) in frozen.frozen


def test_plan_maps_the_sides_to_the_kinds_roles():
    # A method speaks of sides; the kind names the roles that play them.
    assert plan("ffa", "frozen", "vera").trained == {ROLE_LAMBDA_B}
    assert plan("fedsa", "frozen", "vera").sent == {ROLE_LAMBDA_D}
    assert ROLE_PROJECTION in plan("fedavg", "frozen", "vera").frozen
    assert plan("fedavg", "shared", "vera").kind.name == "vera" and plan("fedavg", "shared").method.name == "fedavg"


@pytest.mark.parametrize(
    "method, head, kind, expected",
    [
        ("fedavg", "shared", "lora", None),
        ("ffa", "shared", "lora", None),
        ("ffa", "frozen", "vera", None),
        ("fedsa", "shared", "lora",
         ("FedSA-LoRA keeps each client's B at home, so the global B stays 0 and its adapter adds nothing to the base "
          "model")),
        ("fedsa", "local", "vera",
         ("FedSA-LoRA keeps each client's lambda_b at home, so the global lambda_b stays 0 and its adapter adds "
          "nothing to the base model; each client keeps its own classifier head, so the global head stays at its "
          "seeded initialisation")),
        ("fedavg", "local", "lora",
         "each client keeps its own classifier head, so the global head stays at its seeded initialisation"),
    ],
)
def test_the_plan_says_when_and_why_the_global_alone_is_no_model(method, head, kind, expected):
    p = plan(method, head, kind)
    assert p.global_is_model == (expected is None)
    assert p.why_global_is_partial() == expected
