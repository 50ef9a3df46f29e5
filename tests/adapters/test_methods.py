"""fedlora_cli.adapters.methods: the method table of methods.md, role by role; Method objects and Plan."""

from __future__ import annotations

import pytest

from fedlora_cli.adapters.methods import plan
from fedlora_cli.adapters.roles import (
    ROLE_A,
    ROLE_B,
    ROLE_HEAD,
)


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
