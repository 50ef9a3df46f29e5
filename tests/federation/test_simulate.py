"""fedlora_cli.federation.simulate: a whole federation on one machine: resuming without redoing work (a run
written with the sha256 digests of an older fedlora too), refusing another recipe's folder, causal-lm
federations of every method and kind, the round rows."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import QuietReporter, legacy_tensor_digest, private_recipe, run
from typer.testing import CliRunner

from fedlora_cli import federation, storage
from fedlora_cli.adapters.methods import plan
from fedlora_cli.adapters.roles import role_of
from fedlora_cli.cli import app
from fedlora_cli.errors import FedloraError
from fedlora_cli.federation import simulate

runner = CliRunner()


def test_simulate_resumes_without_redoing_work(tmp_path, make_recipe, cached_federation, monkeypatch):

    recipe = make_recipe("fedsa")
    reference = cached_federation(recipe)  # an uninterrupted run of the same recipe, simulated once per session

    real = federation.train_client
    calls = []

    def crash_on_fifth(*args, **kwargs):
        calls.append(args[4])
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(federation.client, "train_client", crash_on_fifth)
    layout = simulate.RunLayout(tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        simulate.simulate(recipe, layout.root, QuietReporter())
    # Round 1 is complete, round 2 has client-0's update, client-1 was interrupted.
    assert layout.global_checkpoint(1).is_dir() and not layout.global_checkpoint(2).exists()
    assert layout.update(2, "client-0").is_dir() and not layout.update(2, "client-1").exists()
    assert not [p for p in layout.update(2, "client-0").parent.iterdir() if p.name.startswith(".")]
    done = {p: p.stat().st_mtime_ns for p in [layout.global_checkpoint(1), layout.update(2, "client-0")]}

    calls.clear()
    monkeypatch.setattr(federation.client, "train_client", real)
    resumed = []
    monkeypatch.setattr(federation.client, "train_client", lambda *a, **k: (resumed.append(a[4]), real(*a, **k))[1])
    simulate.simulate(recipe, layout.root, QuietReporter())
    assert resumed == ["client-1", "client-2"]
    assert {p: p.stat().st_mtime_ns for p in done} == done
    # The resumed run is bit-identical to the uninterrupted one.
    same = storage.read_global(layout.global_checkpoint(2)).manifest.digest
    assert same == storage.read_global(reference.global_checkpoint(2)).manifest.digest


def test_a_run_written_with_sha256_digests_resumes(tmp_path, make_recipe, cached_federation, monkeypatch):
    recipe = make_recipe("ffa")  # FFA: its frozen A's digests must survive the change of algorithm
    reference = cached_federation(recipe)  # the same federation, written with xxh128 digests throughout
    layout = simulate.RunLayout(tmp_path / "run")
    real = federation.train_client
    calls = []

    def crash_on_fifth(*args, **kwargs):
        calls.append(args[4])
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    # An older fedlora: every tensor digest it wrote was bare sha256 hex (all writers go through tensor_digest).
    # It finished round 1 and was interrupted in round 2, after client-0's update.
    with monkeypatch.context() as old:
        old.setattr(storage, "tensor_digest", lambda t, algorithm=None: legacy_tensor_digest(t))
        old.setattr(federation.client, "train_client", crash_on_fifth)
        with pytest.raises(KeyboardInterrupt):
            simulate.simulate(recipe, layout.root, QuietReporter())
    g0, g1 = (storage.read_global(layout.global_checkpoint(r)).manifest for r in (0, 1))
    old_update = storage.read_update(layout.update(2, "client-0")).manifest
    for digest in [*g1.tensor_digests.values(), *old_update.tensor_digests.values()]:
        assert storage.digest_algorithm(digest) == "sha256" and ":" not in digest
    written = {p: p.stat().st_mtime_ns for p in layout.global_checkpoint(1).iterdir()}

    # This fedlora resumes it: trains client-1 and client-2 from the old global, aggregates the three updates.
    simulate.simulate(recipe, layout.root, QuietReporter())

    assert {p: p.stat().st_mtime_ns for p in written} == written  # the old global is read, not rewritten
    assert storage.read_update(layout.update(2, "client-0")).manifest == old_update  # nor the old update
    g1_read = federation.Global.of(layout.global_checkpoint(1)).verify()
    assert g1_read.manifest.digest == g1.digest  # its identity stays the one its updates carry
    new_update = storage.read_update(layout.update(2, "client-1")).manifest
    assert new_update.parent_digest == g1.digest
    assert all(d.startswith("xxh128:") for d in new_update.tensor_digests.values())
    g2 = federation.Global.of(layout.global_checkpoint(2)).verify()
    frozen_a = [n for n in g2.manifest.tensor_digests if role_of(n) in plan("ffa", "shared").frozen]
    assert frozen_a and all(g2.manifest.tensor_digests[n] == g0.tensor_digests[n] for n in frozen_a)
    assert g2.manifest.frozen_digest == g1.frozen_digest == g0.frozen_digest
    assert any(d.startswith("xxh128:") for d in g2.manifest.tensor_digests.values())
    # And it is the federation an uninterrupted run of this fedlora trains, bit for bit.
    expected = federation.Global.of(reference.global_checkpoint(2)).verified_tensors
    assert set(g2.verified_tensors) == set(expected)
    assert all(torch.equal(g2.verified_tensors[n], expected[n]) for n in expected)


def test_simulate_refuses_a_different_recipe_in_the_same_folder(tmp_path, make_recipe, federation_copy):
    layout = federation_copy(make_recipe("ffa"))  # a finished run of the ffa recipe, ours to write into

    with pytest.raises(FedloraError, match="different recipe"):
        simulate.simulate(make_recipe("ffa", lr=0.5), layout.root, QuietReporter())


@pytest.mark.parametrize(
    "method, sections",
    [
        ("fedavg", {}),
        ("ffa", {}),
        ("fedsa", {}),
        ("fedsa", {"adapter": {"kind": "rslora"}}),
        ("ffa", {"adapter": {"kind": "vera", "r": 16}}),
        ("fedavg", {"federation": {"aggregation": "svd"}}),
        ("ffa", {"privacy": {"noise_multiplier": 0.5, "max_grad_norm": 1.0, "delta": 1e-3}, "training": {"optimizer": "sgd", "lr": 0.5}}),
    ],
)
def test_every_method_kind_and_dp_trains_a_causal_lm(method, sections, make_causal_recipe, cached_federation):
    r = make_causal_recipe(method, sections={"federation": {"rounds": 1}, **sections})
    layout = cached_federation(r)
    g0 = storage.read_global(layout.global_checkpoint(0)).tensors()
    g1 = storage.read_global(layout.global_checkpoint(1)).tensors()
    p = plan(method, "frozen", r.adapter.kind)
    assert not [n for n in g0 if role_of(n) == "head"], "a causal LM adapter has no head tensors"
    moved = [n for n in g0 if not torch.equal(g0[n], g1[n])]
    assert moved and all(p.sends(n) for n in moved)
    frozen = [n for n in g0 if role_of(n) in p.frozen]
    assert all(torch.equal(g0[n], g1[n]) for n in frozen)
    metrics = json.loads((layout.metrics(1)).read_text())
    assert metrics["global"]["task"] == "causal-lm" and metrics["global"]["loss"] > 0
    if r.privacy is not None:
        assert storage.read_update(layout.update(1, "client-0")).manifest.privacy["epsilon"] > 0


def test_simulate_reports_the_epsilon_spent(tmp_path, tiny_model_dir, reviews_csv):
    raw = private_recipe(tiny_model_dir, reviews_csv, noise_multiplier=1.0)
    raw["federation"]["rounds"] = 1
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    result = runner.invoke(app, ["simulate", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "run"), "--json"])
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)["rounds"][0]
    updates = [storage.read_update(tmp_path / "run" / "updates" / "round-001" / f"client-{k}").manifest for k in range(3)]
    assert row["epsilon"] == max(u.privacy["epsilon"] for u in updates) > 0


def test_keep_state_rounds_prunes_old_client_state(scaled, tmp_path):
    layout = run(scaled("fedsa", clients=3, rounds=3), tmp_path / "run", keep_state_rounds=1)
    for cid in ("client-0", "client-1", "client-2"):
        assert storage.state_rounds(layout.state(cid)) == [3]
    full = run(scaled("fedsa", clients=3, rounds=3), tmp_path / "full")
    assert storage.state_rounds(full.state("client-0")) == [1, 2, 3]
    # Pruning changes nothing the federation computes.
    for r in (1, 2, 3):
        assert (storage.read_global(layout.global_checkpoint(r)).manifest.digest
                == storage.read_global(full.global_checkpoint(r)).manifest.digest)
