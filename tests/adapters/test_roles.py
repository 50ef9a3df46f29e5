"""fedlora_cli.adapters.roles: the role of every adapter tensor, read from its PEFT name."""

from __future__ import annotations

from fedlora_cli.adapters.roles import ROLE_A, ROLE_B, ROLE_HEAD, role_of


def test_roles_from_peft_names():
    assert role_of("base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight") == ROLE_A
    assert role_of("base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.default.weight") == ROLE_B
    assert role_of("base_model.model.classifier.modules_to_save.default.weight") == ROLE_HEAD
    assert role_of("base_model.model.classifier.bias") == ROLE_HEAD


def test_vera_roles_from_peft_names():
    from fedlora_cli.adapters.roles import ROLE_LAMBDA_B, ROLE_LAMBDA_D, ROLE_PROJECTION

    assert role_of("base_model.model.bert.encoder.layer.0.attention.self.query.vera_lambda_d") == ROLE_LAMBDA_D
    assert role_of("base_model.model.bert.encoder.layer.0.attention.self.query.vera_lambda_b.default") == ROLE_LAMBDA_B
    assert role_of("base_model.vera_A") == ROLE_PROJECTION
    assert role_of("base_model.vera_B") == ROLE_PROJECTION
