"""fedlora_cli.federation.common: what every step of a round shares: the Global checkpoint read and verified once,
and the global adapter as a client of a lower rank receives it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import QuietReporter
from safetensors.torch import load_file

from fedlora_cli import storage
from fedlora_cli.adapters.kinds import adapter_kind
from fedlora_cli.adapters.roles import ROLE_A, ROLE_B, role_of
from fedlora_cli.errors import FedloraError
from fedlora_cli.federation import Global, received_tensors

CLIENTS = ["client-0", "client-1", "client-2"]


ALPHA, RANK = 8.0, 4  # conftest's adapter: r = 4, alpha = 8


def weights_of(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / storage.ADAPTER_WEIGHTS))


def sent(layout, round_: int, client: str) -> dict[str, torch.Tensor]:
    return load_file(str(layout.update(round_, client) / storage.UPDATE_TENSORS))


def test_heterogeneous_ranks_each_client_trains_and_receives_its_own_rank(strategy_recipe, tmp_path, monkeypatch):
    from fedlora_cli.federation import simulate
    from fedlora_cli.model import training

    ranks = {"client-0": 1, "client-1": 2}  # client-2 trains the global rank 4
    recipe = strategy_recipe(client_ranks=ranks, aggregation="svd")
    received: list[dict[str, torch.Tensor]] = []
    real = training.local_train

    def spy(bench, plan, examples, seed, progress=None, dp=None):
        received.append({n: t.clone() for n, t in bench.adapter_tensors().items()})
        return real(bench, plan, examples, seed, progress, dp)

    monkeypatch.setattr(training, "local_train", spy)
    layout = simulate.RunLayout(tmp_path / "run")
    rows = simulate.simulate(recipe, layout.root, QuietReporter())

    rank_of = {c: ranks.get(c, RANK) for c in CLIENTS}
    for round_ in (1, 2):
        g = weights_of(layout.global_checkpoint(round_))
        assert all(t.shape[0] == RANK for n, t in g.items() if role_of(n) == ROLE_A), "the global holds rank r"
        for client in CLIENTS:
            for name, t in sent(layout, round_, client).items():
                if role_of(name) == ROLE_A:
                    assert t.shape[0] == rank_of[client]
                if role_of(name) == ROLE_B:
                    assert t.shape[1] == rank_of[client]
    # Round 2 starts (calls 4..6) from the round-1 global truncated to each client's rank, rescaled to its scale.
    g1 = weights_of(layout.global_checkpoint(1))
    for k, client in enumerate(CLIENTS):
        r = rank_of[client]
        start = received[3 + k]
        for layer, (a, b) in adapter_kind("lora").layers(g1).items():
            assert start[a].shape == (r, g1[a].shape[1]) and start[b].shape == (g1[b].shape[0], r)
            torch.testing.assert_close(start[a], g1[a][:r])
            torch.testing.assert_close(start[b], g1[b][:, :r] * (ALPHA / RANK) / (ALPHA / r))
    # Every client's personalised model (the global at its rank) is evaluated.
    assert rows[-1]["personalised_accuracy"] is not None


# Global: a global checkpoint read and verified once ------------------------------------------------------------


def count_reads(monkeypatch) -> dict:
    """From now on, count every safetensors file a Global reads and verifies, every tensor hashed and every
    recipe parsed."""
    from fedlora_cli import recipe as recipes
    from fedlora_cli.storage import files

    counts = {"loads": [], "digests": 0, "recipes": 0}
    real_load, real_hash, real_from_dict = storage.load_verified, files._hex_digest, recipes.from_dict

    def load(path, digests, what, *framework):
        counts["loads"].append(what)
        return real_load(path, digests, what, *framework)

    def hash_(t, algorithm):  # where every digest, written or checked, hashes a tensor's bytes
        counts["digests"] += 1
        return real_hash(t, algorithm)

    def from_dict(raw):
        counts["recipes"] += 1
        return real_from_dict(raw)

    monkeypatch.setattr(storage, "load_verified", load)
    monkeypatch.setattr(files, "_hex_digest", hash_)
    monkeypatch.setattr(recipes, "from_dict", from_dict)
    return counts


def test_global_reads_and_verifies_its_tensors_once(strategy_recipe, cached_federation, monkeypatch):
    path = cached_federation(strategy_recipe(aggregation="exact")).global_checkpoint(1)  # with a correction
    counted_reads = count_reads(monkeypatch)

    g = Global.of(path)
    assert counted_reads == {"loads": [], "digests": 0, "recipes": 0}, "only the manifest is read up front"
    tensors = g.verified_tensors
    correction = g.verified_correction
    assert g.verify() is g and Global.of(g) is g
    assert g.verified_tensors is tensors and g.verified_correction is correction
    assert g.recipe is g.recipe and g.plan is g.plan

    assert counted_reads["loads"] == ["global checkpoint weights", "global checkpoint correction"]
    assert counted_reads["digests"] == len(tensors) + len(correction) and correction
    assert counted_reads["recipes"] == 1
    assert set(tensors) == set(g.manifest.tensor_digests) and set(correction) == set(g.manifest.correction_digests)


@pytest.mark.parametrize("first", ["tensors", "arrays"])
def test_a_global_read_as_arrays_or_tensors_is_read_once(first, strategy_recipe, cached_federation, monkeypatch):
    path = cached_federation(strategy_recipe(aggregation="exact")).global_checkpoint(1)  # with a correction
    counted_reads = count_reads(monkeypatch)
    g = Global.of(path)
    parts = {"tensors": ("verified_tensors", "verified_correction"),
             "arrays": ("verified_arrays", "verified_correction_arrays")}
    second = "arrays" if first == "tensors" else "tensors"

    read = [getattr(g, name) for name in parts[first]]
    viewed = [getattr(g, name) for name in parts[second]]

    assert counted_reads["loads"] == ["global checkpoint weights", "global checkpoint correction"]
    for held, view in zip(read, viewed):
        arrays, tensors = (held, view) if first == "arrays" else (view, held)
        assert set(arrays) == set(tensors) and all(arrays[n].ctypes.data == tensors[n].data_ptr() for n in arrays)


def test_global_refuses_tensors_that_do_not_match_its_manifest(make_recipe, cached_federation, strategy_recipe, tmp_path):
    from safetensors.torch import save_file

    source = cached_federation(make_recipe("fedavg")).global_checkpoint(1)
    shutil.copytree(source, tmp_path / "g")
    tensors = load_file(str(tmp_path / "g" / storage.ADAPTER_WEIGHTS))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1e-3
    save_file(tensors, str(tmp_path / "g" / storage.ADAPTER_WEIGHTS))
    with pytest.raises(FedloraError, match=rf"adapter_model.safetensors: tensor '{name}' does not match the digest"):
        Global.of(tmp_path / "g").verify()

    shutil.copytree(cached_federation(strategy_recipe(aggregation="exact")).global_checkpoint(1), tmp_path / "e")
    correction = load_file(str(tmp_path / "e" / storage.CORRECTION_TENSORS))
    layer = sorted(correction)[0]
    correction[layer] = correction[layer] * 2
    save_file(correction, str(tmp_path / "e" / storage.CORRECTION_TENSORS))
    g = Global.of(tmp_path / "e")
    assert g.verified_tensors  # the adapter tensors are fine...
    with pytest.raises(FedloraError, match=rf"correction.safetensors: tensor '{layer}' does not match the digest"):
        g.verified_correction


def test_global_written_needs_no_read_at_all(make_recipe, cached_federation, monkeypatch):
    from fedlora_cli import recipe as recipes
    from fedlora_cli.storage import checkpoints, files

    recipe = make_recipe("fedavg")
    ckpt = storage.read_global(cached_federation(recipe).global_checkpoint(2))
    tensors, correction = ckpt.tensors(), ckpt.correction()

    def no(*args, **kwargs):
        raise AssertionError("Global.written read or hashed something")

    monkeypatch.setattr(checkpoints, "load_tensors", no)
    monkeypatch.setattr(storage, "load_verified", no)
    monkeypatch.setattr(files, "_hex_digest", no)
    monkeypatch.setattr(recipes, "from_dict", no)

    g = Global.written(ckpt, recipe, tensors, correction)
    assert g.verify() is g
    assert g.verified_tensors is tensors and g.verified_correction is correction and g.recipe is recipe
    assert g.plan.method.name == "fedavg" and g.path == ckpt.path and g.manifest is ckpt.manifest


def test_received_tensors_truncate_and_rescale_for_a_lower_rank(strategy_recipe, cached_federation):
    recipe = strategy_recipe(client_ranks={"client-0": 1, "client-1": 2}, aggregation="svd")
    g = Global.of(cached_federation(recipe).global_checkpoint(2))
    tensors = g.verified_tensors
    assert received_tensors(recipe, tensors, RANK) is tensors  # a client of the global rank gets the global as is
    got = received_tensors(recipe, tensors, 2)
    for a, b in adapter_kind("lora").layers(tensors).values():
        torch.testing.assert_close(got[a], tensors[a][:2])
        # LoRA scale alpha / r: the global's 8 / 4 = 2, the client's 8 / 2 = 4, so B is halved.
        torch.testing.assert_close(got[b], tensors[b][:, :2] * 0.5)
    assert all(torch.equal(got[n], t) for n, t in tensors.items() if role_of(n) not in (ROLE_A, ROLE_B))
