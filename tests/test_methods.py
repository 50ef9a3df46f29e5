"""The method table of methods.md, role by role."""

from __future__ import annotations

import pytest

from fedlora_cli.methods import ROLE_A, ROLE_B, ROLE_HEAD, plan, role_of


def test_roles_from_peft_names():
    assert role_of("base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight") == ROLE_A
    assert role_of("base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.default.weight") == ROLE_B
    assert role_of("base_model.model.classifier.modules_to_save.default.weight") == ROLE_HEAD
    assert role_of("base_model.model.classifier.bias") == ROLE_HEAD


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
