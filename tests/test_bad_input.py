"""Every mistake a user can make: one clear error line, exit code 1, no traceback, nothing half-written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from fedlora_cli import checkpoint
from fedlora_cli.cli import app

from conftest import recipe_dict

runner = CliRunner()


def fails(args: list[str], *needles: str) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    output = result.output
    assert result.exit_code == 1, output
    assert "Traceback" not in output
    assert "error:" in output
    lines = [line for line in output.strip().splitlines() if line.strip()]
    error_lines = [line for line in lines if "error:" in line]
    assert len(error_lines) == 1, output
    text = " ".join(output.split())
    for needle in needles:
        assert needle in text, f"{needle!r} not in {text!r}"
    return text


@pytest.fixture
def run(make_recipe, run_federation):
    """A finished 2-round FFA federation to corrupt copies of."""
    return run_federation(make_recipe("ffa"))


def copy_update(layout, tmp_path: Path, client: str = "client-0", round_: int = 1) -> Path:
    dst = tmp_path / f"bad-{client}-{round_}"
    shutil.copytree(layout.update(round_, client), dst)
    return dst


def edit_manifest(update: Path, **changes) -> None:
    path = update / checkpoint.UPDATE_MANIFEST
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def aggregate_fails(layout, tmp_path, updates, *needles):
    out = tmp_path / "next"
    fails(["aggregate", layout.global_checkpoint(0), *updates, "--out", out], *needles)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".next")], "temporary folder left behind"


def good_updates(layout, skip: str | None = None) -> list[Path]:
    return [layout.update(1, c) for c in ("client-0", "client-1", "client-2") if c != skip]


def test_missing_recipe_file(tmp_path):
    out = tmp_path / "g"
    fails(["init", tmp_path / "nope.yaml", "--out", out], "recipe not found")
    assert not out.exists()


def test_unknown_recipe_key_is_named(tmp_path, tiny_model_dir, reviews_csv):
    raw = recipe_dict(tiny_model_dir, reviews_csv)
    raw["training"]["learning_rate"] = 0.1
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    fails(["init", path, "--out", tmp_path / "g"], "training.learning_rate")
    fails(["recipes", "validate", path], "training.learning_rate")


def test_unknown_override_key_is_named(tmp_path, tiny_model_dir, reviews_csv):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(tiny_model_dir, reviews_csv)))
    fails(["recipes", "validate", path, "--set", "federation.methd=ffa"], "federation.methd")
    fails(["recipes", "validate", path, "--set", "federation.method=fedprox"], "federation.method")


def test_missing_global_checkpoint(tmp_path, partition_dir):
    out = tmp_path / "u"
    fails(["train-client", tmp_path / "nowhere", "--data", partition_dir / "client-0.parquet",
           "--state", tmp_path / "s", "--out", out], "global checkpoint not found")
    assert not out.exists()


def test_missing_shard(run, tmp_path):
    out = tmp_path / "u"
    fails(["train-client", run.global_checkpoint(2), "--data", tmp_path / "no.parquet",
           "--state", tmp_path / "s", "--out", out], "data shard not found")
    assert not out.exists()


def test_update_from_another_round(run, tmp_path):
    aggregate_fails(run, tmp_path, [*good_updates(run, "client-2"), run.update(2, "client-2")], "round 2")


def test_update_from_another_base_model(run, tmp_path):
    bad = copy_update(run, tmp_path)
    edit_manifest(bad, base_fingerprint="0123456789abcdef")
    aggregate_fails(run, tmp_path, [bad, *good_updates(run, "client-0")], "different base model")


def test_update_from_another_global(run, tmp_path):
    bad = copy_update(run, tmp_path)
    edit_manifest(bad, parent_digest="f" * 64)
    aggregate_fails(run, tmp_path, [bad, *good_updates(run, "client-0")], "parent digest")


def test_ffa_client_with_a_different_a(run, tmp_path):
    bad = copy_update(run, tmp_path)
    edit_manifest(bad, frozen_digest="e" * 64)
    aggregate_fails(run, tmp_path, [bad, *good_updates(run, "client-0")], "frozen A")


def test_mismatched_shapes(run, tmp_path):
    bad = copy_update(run, tmp_path)
    tensors = load_file(str(bad / checkpoint.UPDATE_TENSORS))
    name = sorted(tensors)[0]
    tensors[name] = torch.zeros(tensors[name].shape[0], tensors[name].shape[1] + 1)
    save_file(tensors, str(bad / checkpoint.UPDATE_TENSORS))
    aggregate_fails(run, tmp_path, [bad, *good_updates(run, "client-0")], name)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_update(run, tmp_path, value):
    bad = copy_update(run, tmp_path)
    tensors = load_file(str(bad / checkpoint.UPDATE_TENSORS))
    name = sorted(tensors)[-1]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = value
    save_file(tensors, str(bad / checkpoint.UPDATE_TENSORS))
    aggregate_fails(run, tmp_path, [*good_updates(run, "client-0"), bad], "NaN or Inf", name)


def test_tampered_update_fails_its_digest(run, tmp_path):
    bad = copy_update(run, tmp_path)
    tensors = load_file(str(bad / checkpoint.UPDATE_TENSORS))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1.0
    save_file(tensors, str(bad / checkpoint.UPDATE_TENSORS))
    aggregate_fails(run, tmp_path, [bad, *good_updates(run, "client-0")], "digests")


def test_truncated_safetensors(run, tmp_path):
    bad = copy_update(run, tmp_path)
    data = (bad / checkpoint.UPDATE_TENSORS).read_bytes()
    (bad / checkpoint.UPDATE_TENSORS).write_bytes(data[: len(data) // 2])
    aggregate_fails(run, tmp_path, [bad, *good_updates(run, "client-0")], "safetensors")


def test_same_client_twice(run, tmp_path):
    dup = copy_update(run, tmp_path)
    aggregate_fails(run, tmp_path, [*good_updates(run), dup], "client-0", "twice")


def test_update_with_a_tensor_the_method_does_not_send(run, tmp_path):
    bad = copy_update(run, tmp_path)
    tensors = load_file(str(bad / checkpoint.UPDATE_TENSORS))
    a_name = next(n for n in load_file(str(run.global_checkpoint(0) / checkpoint.ADAPTER_WEIGHTS)) if "lora_A" in n)
    tensors[a_name] = torch.zeros(4, 32)
    save_file(tensors, str(bad / checkpoint.UPDATE_TENSORS))
    aggregate_fails(run, tmp_path, [bad, *good_updates(run, "client-0")], "does not send")


def test_pickle_file_is_never_loaded(run, tmp_path):
    """A client that sends a torch.save pickle instead of safetensors is refused, not unpickled."""
    bad = copy_update(run, tmp_path)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    import pickle

    (bad / checkpoint.UPDATE_TENSORS).write_bytes(pickle.dumps(Evil()))
    aggregate_fails(run, tmp_path, [bad, *good_updates(run, "client-0")], "safetensors")
    assert not marker.exists()


def test_existing_output_is_not_overwritten(run, tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    fails(["aggregate", run.global_checkpoint(0), *good_updates(run), "--out", out], "already exists")
    assert (out / "keep.txt").read_text() == "mine"


def test_client_state_of_another_client(run, tmp_path):
    out = tmp_path / "u"
    fails(["train-client", run.global_checkpoint(2), "--data", run.data / "client-0.parquet",
           "--state", run.state("client-1"), "--client-id", "client-0", "--out", out], "belongs to client")
    assert not out.exists()


def test_base_model_that_cannot_be_found(run, tmp_path):
    out = tmp_path / "u"
    fails(["train-client", run.global_checkpoint(2), "--data", run.data / "client-0.parquet",
           "--state", tmp_path / "s", "--out", out, "--base-model", tmp_path / "no-model"], "cannot load base model")
    assert not out.exists()


def test_partition_missing_column(tmp_path, reviews_csv):
    out = tmp_path / "p"
    fails(["partition", reviews_csv, "--label-column", "stars", "--out", out], "column 'stars'")
    assert not out.exists()


def test_partition_missing_file(tmp_path):
    out = tmp_path / "p"
    fails(["partition", tmp_path / "none.csv", "--out", out], "not found")
    assert not out.exists()
