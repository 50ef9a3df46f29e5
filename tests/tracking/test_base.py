"""fedlora_cli.tracking.base: a run's identity, kept in its home so a resumed run continues the same tracker run."""

from __future__ import annotations

import json

import pytest

from fedlora_cli.errors import FedloraError
from fedlora_cli.tracking.base import RunIdentity, axis_of, missing_package, safe_name


def test_a_run_identity_is_made_once_and_kept(tmp_path):
    home = tmp_path / "quickstart"
    first = RunIdentity.of(home, "quickstart recipe")
    assert (first.experiment, first.name, len(first.id)) == ("quickstart recipe", "quickstart", 16)
    assert json.loads((home / "tracking" / "run.json").read_text())["id"] == first.id
    first.logged["mlflow"] = 2
    first.save()
    again = RunIdentity.of(home, "another name")  # the stored names win: the run keeps its names
    assert (again.id, again.experiment, again.logged) == (first.id, "quickstart recipe", {"mlflow": 2})
    assert RunIdentity.of(tmp_path / "other", "quickstart recipe").id != first.id


def test_a_malformed_identity_is_one_clear_error(tmp_path):
    (tmp_path / "tracking").mkdir()
    (tmp_path / "tracking" / "run.json").write_text('{"id": "x"}')
    with pytest.raises(FedloraError, match="run.json is malformed; delete it"):
        RunIdentity.of(tmp_path, "r")


def test_names_axes_and_the_missing_package_message():
    assert safe_name("my recipe/v2") == "my-recipe-v2" and safe_name("///") == "run"
    assert axis_of("round/global_accuracy") == "round" and axis_of("step/client-0/train_loss") == "step"
    assert str(missing_package("mlflow", "mlflow-skinny", "mlflow")) == (
        "tracker 'mlflow' needs the mlflow-skinny package, which is not installed: pip install 'fedlora[mlflow]'"
    )
