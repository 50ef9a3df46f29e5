"""fedlora_cli.recipe.schema: the recipe's identity (its digest)."""

from __future__ import annotations

from fedlora_cli import recipe as recipes


def base() -> dict:
    return {"model": {"base": "some/model"}}


def test_digest_changes_with_any_value():
    a = recipes.from_dict(base())
    b = recipes.from_dict({**base(), "training": {"lr": 0.001}})
    assert a.digest() == recipes.from_dict(base()).digest()
    assert a.digest() != b.digest()
