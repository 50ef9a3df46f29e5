"""A site answers "who are you" with the base-model fingerprint `fedlora init` recorded, read from its files: no
model load and no torch import, however the site loads its base; a base without safetensors files is loaded."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import recipe_dict
from typer.testing import CliRunner

from fedlora_cli import storage
from fedlora_cli.cli import app
from fedlora_cli.flower import site as sites
from fedlora_cli.flower.site import SiteConfig, describe, manifest_of


@pytest.fixture(scope="module")
def g0(tmp_path_factory, tiny_model_dir, reviews_csv, partition_dir) -> Path:
    """A global checkpoint made by `fedlora init` of the tiny BERT's federation."""
    root = tmp_path_factory.mktemp("identify")
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe_dict(tiny_model_dir, reviews_csv)))
    result = CliRunner().invoke(app, ["init", str(root / "recipe.yaml"), "--data", str(partition_dir),
                                      "--out", str(root / "g0")])
    assert result.exit_code == 0, result.output
    return root / "g0"


def _manifest(g0: Path):
    return manifest_of((g0 / storage.GLOBAL_MANIFEST).read_text())


def _no_load(*args, **kwargs):
    raise AssertionError("the base model was loaded")


def test_a_site_at_another_path_loading_bfloat16_answers_the_recorded_fingerprint_without_loading(
    g0, tiny_model_dir, tmp_path, monkeypatch
):
    monkeypatch.setattr(sites, "build_for_site", _no_load)
    copy = shutil.copytree(tiny_model_dir, tmp_path / "our-copy")
    site = SiteConfig.from_node_config({"client-id": "client-1", "state-dir": str(tmp_path / "s"),
                                        "base": str(copy), "dtype": "bfloat16", "device": "cpu"})
    answer = describe(site, _manifest(g0))
    assert answer == {"client-id": "client-1", "base-fingerprint": _manifest(g0).base_fingerprint,
                      "site": "cpu · base bfloat16"}


def test_a_site_with_another_base_answers_another_fingerprint(g0, tiny_model_dir, tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    monkeypatch.setattr(sites, "build_for_site", _no_load)
    other = Path(shutil.copytree(tiny_model_dir, tmp_path / "fine-tune"))
    tensors = {name: t + 0.5 for name, t in load_file(other / "model.safetensors").items()}
    save_file(tensors, other / "model.safetensors", metadata={"format": "pt"})
    site = SiteConfig.from_node_config({"client-id": "client-1", "state-dir": str(tmp_path / "s"), "base": str(other)})
    assert describe(site, _manifest(g0))["base-fingerprint"] != _manifest(g0).base_fingerprint


def test_a_base_without_safetensors_is_loaded_to_be_identified(g0, tiny_model_dir, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    folder = Path(shutil.copytree(tiny_model_dir, tmp_path / "bin"))
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    loads = []
    build = sites.build_for_site
    monkeypatch.setattr(sites, "build_for_site", lambda *a, **k: loads.append(a) or build(*a, **k))
    site = SiteConfig.from_node_config({"client-id": "client-1", "state-dir": str(tmp_path / "s"), "base": str(folder)})
    answer = describe(site, _manifest(g0))
    assert len(loads) == 1 and answer["site"] == "cpu · base float32"
    assert len(answer["base-fingerprint"]) == 16 and answer["base-fingerprint"] != _manifest(g0).base_fingerprint


def test_identifying_a_site_imports_no_torch(g0, tmp_path):
    code = (
        "import json, sys\n"
        "from fedlora_cli.flower.site import SiteConfig, describe, manifest_of\n"
        f"manifest = manifest_of(open({str(g0 / storage.GLOBAL_MANIFEST)!r}).read())\n"
        f"site = SiteConfig.from_node_config({{'client-id': 'client-0', 'state-dir': {str(tmp_path)!r}}})\n"
        "print(json.dumps([describe(site, manifest), 'torch' in sys.modules]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr
    answer, torch_imported = json.loads(done.stdout.splitlines()[-1])
    assert not torch_imported
    assert answer["base-fingerprint"] == _manifest(g0).base_fingerprint


def test_a_resident_worker_says_who_it_is_from_the_base_files_without_loading_the_model(g0, tmp_path, monkeypatch):
    from fedlora_cli.flower import channel, worker as workers

    monkeypatch.setattr(sites, "build_for_site", _no_load)
    monkeypatch.setattr("fedlora_cli.federation.common.build_for_site", _no_load)
    node = {"client-id": "client-0", "state-dir": str(tmp_path / "s")}
    worker = workers.Worker(SiteConfig.from_node_config(node), log=lambda line: None)
    answer = worker.handle({"protocol": channel.PROTOCOL, "op": "query", "node-config": node,
                            "manifest": (g0 / storage.GLOBAL_MANIFEST).read_text()})
    assert answer == {"ok": {"client-id": "client-0", "base-fingerprint": _manifest(g0).base_fingerprint,
                             "site": "auto · base float32"}}  # as given: resolved when it trains
    assert worker.benches.loads == 0 and len(worker.benches) == 0


def test_a_resident_worker_loads_a_base_without_safetensors_once_for_who_it_is_and_its_first_round(
        g0, tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    from fedlora_cli.flower import channel, worker as workers

    folder = Path(shutil.copytree(tiny_model_dir, tmp_path / "bin"))
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    node = {"client-id": "client-0", "state-dir": str(tmp_path / "s"), "base": str(folder)}
    worker = workers.Worker(SiteConfig.from_node_config(node), log=lambda line: None)
    manifest = _manifest(g0)
    answer = worker.handle({"protocol": channel.PROTOCOL, "op": "query", "node-config": node,
                            "manifest": (g0 / storage.GLOBAL_MANIFEST).read_text()})
    assert answer["ok"]["base-fingerprint"] != manifest.base_fingerprint  # a .bin base: the loaded model's
    recipe = sites.recipes.from_dict(manifest.recipe)
    assert worker.bench(recipe, manifest.num_labels, recipe.adapter.r) is worker.benches.held()[0]
    assert worker.benches.loads == 1
