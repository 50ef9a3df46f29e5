"""fedlora_cli.recipe.schema: the recipe's identity (its digest), which the trackers are not part of."""

from __future__ import annotations

from fedlora_cli import recipe as recipes, tracking


def base() -> dict:
    return {"model": {"base": "some/model"}}


def test_digest_changes_with_any_value():
    a = recipes.from_dict(base())
    b = recipes.from_dict({**base(), "training": {"lr": 0.001}})
    assert a.digest() == recipes.from_dict(base()).digest()
    assert a.digest() != b.digest()


def test_the_tracking_section_lists_the_trackers_and_stays_out_of_the_digest():
    assert recipes.TRACKERS == tuple(tracking.BACKENDS) == ("tensorboard", "mlflow", "wandb")
    tracked = recipes.from_dict({**base(), "tracking": {"report_to": "tensorboard,wandb"}})
    assert tracked.tracking.report_to == ["tensorboard", "wandb"] and recipes.from_dict(base()).tracking is None
    # Each site may watch the federation with its own trackers: the checkpoints' recipe digest ignores them.
    assert tracked.digest() == recipes.from_dict(base()).digest()
