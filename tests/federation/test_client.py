"""fedlora_cli.federation.client: one client's round, checked on the files it writes: what each method sends and
keeps (FFA-LoRA: A never changes and never travels, half the upload; FedSA-LoRA: B stays home and differs per
client; their VeRA versions), reproducibility, the DP-SGD ledger in the client state, and the ClientRound returned."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import private_recipe
from safetensors.torch import load_file
from typer.testing import CliRunner

from fedlora_cli import federation, recipe as recipes, storage
from fedlora_cli.adapters.roles import ROLE_HEAD, ROLE_LAMBDA_B, ROLE_LAMBDA_D, ROLE_PROJECTION, role_of
from fedlora_cli.cli import app
from fedlora_cli.errors import FedloraError

CLIENTS = ["client-0", "client-1", "client-2"]


def weights_of(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / storage.ADAPTER_WEIGHTS))


def update_tensors(layout, round_: int, client: str) -> dict[str, torch.Tensor]:
    return load_file(str(layout.update(round_, client) / storage.UPDATE_TENSORS))


def lora_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for n, t in tensors.items() if role_of(n) in ("lora_A", "lora_B"))


def roles(names) -> set[str]:
    return {role_of(n) for n in names}


def sent_tensors(layout, round_: int, client: str) -> dict[str, torch.Tensor]:
    return load_file(str(layout.update(round_, client) / storage.UPDATE_TENSORS))


def global_tensors(layout, round_: int) -> dict[str, torch.Tensor]:
    return load_file(str(layout.global_checkpoint(round_) / storage.ADAPTER_WEIGHTS))


def test_ffa_keeps_a_bit_identical_and_never_sends_it(make_recipe, cached_federation):
    layout = cached_federation(make_recipe("ffa"))
    a0 = {n: t for n, t in weights_of(layout.global_checkpoint(0)).items() if role_of(n) == "lora_A"}
    assert a0, "the adapter has lora_A tensors"
    for round_ in (1, 2):
        g = weights_of(layout.global_checkpoint(round_))
        for name, t in a0.items():
            assert torch.equal(g[name], t), f"{name} changed in round {round_}"
        for client in CLIENTS:
            sent = update_tensors(layout, round_, client)
            assert not [n for n in sent if role_of(n) == "lora_A"]
            assert [n for n in sent if role_of(n) == "lora_B"]
    # B did train: the round-2 global B is not the zero init.
    b2 = [t for n, t in weights_of(layout.global_checkpoint(2)).items() if role_of(n) == "lora_B"]
    assert any(t.abs().sum() > 0 for t in b2)


def test_ffa_lora_upload_is_exactly_half_of_fedavg(make_recipe, cached_federation):
    ffa = cached_federation(make_recipe("ffa"))
    fedavg = cached_federation(make_recipe("fedavg"))
    ffa_bytes = lora_bytes(update_tensors(ffa, 1, "client-0"))
    fedavg_bytes = lora_bytes(update_tensors(fedavg, 1, "client-0"))
    assert ffa_bytes > 0
    assert 2 * ffa_bytes == fedavg_bytes


def test_fedsa_keeps_b_home_and_personalises(make_recipe, cached_federation):
    layout = cached_federation(make_recipe("fedsa"))
    for round_ in (1, 2):
        for client in CLIENTS:
            sent = update_tensors(layout, round_, client)
            assert [n for n in sent if role_of(n) == "lora_A"]
            assert not [n for n in sent if role_of(n) == "lora_B"]
    own_b = {}
    for client in CLIENTS:
        state = storage.latest_state(layout.state(client), before_round=3)
        assert state is not None and state.manifest.round == 2
        kept = state.tensors()
        assert kept and all(role_of(n) == "lora_B" for n in kept)
        own_b[client] = kept
        assert (layout.state(client) / storage.round_dirname(1)).is_dir()
    name = next(iter(own_b["client-0"]))
    assert not torch.equal(own_b["client-0"][name], own_b["client-1"][name])
    assert not torch.equal(own_b["client-1"][name], own_b["client-2"][name])
    # The global checkpoint's B is still the zero init: B is never aggregated.
    g = weights_of(layout.global_checkpoint(2))
    assert all(float(g[n].abs().sum()) == 0 for n in own_b["client-0"])


def test_fedsa_round_starts_from_the_clients_own_b(make_recipe, tmp_path, monkeypatch):
    """Spy on local training: at the start of round 2 each client holds exactly its own round-1 B."""
    from conftest import QuietReporter

    from fedlora_cli.federation import simulate
    from fedlora_cli.model import training

    seen: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
    real = training.local_train
    calls = []

    def spy(bench, plan, examples, seed, progress=None, dp=None):
        calls.append(1)
        tensors = bench.adapter_tensors()
        seen[len(calls)] = {n: t.clone() for n, t in tensors.items() if role_of(n) == "lora_B"}
        return real(bench, plan, examples, seed, progress, dp)

    monkeypatch.setattr(training, "local_train", spy)
    layout = simulate.RunLayout(tmp_path / "run")
    simulate.simulate(make_recipe("fedsa"), layout.root, QuietReporter())
    assert len(calls) == 6  # 3 clients x 2 rounds, clients in order
    for k, client in enumerate(CLIENTS):
        start_round_2 = seen[4 + k]
        state_round_1 = load_file(str(layout.state(client) / "round-001" / storage.STATE_TENSORS))
        assert set(start_round_2) == set(state_round_1)
        for name, t in state_round_1.items():
            assert torch.equal(start_round_2[name], t), f"{client} did not resume from its own B"


def test_fedsa_vera_never_sends_lambda_b(kind_recipe, cached_federation):
    layout = cached_federation(kind_recipe("vera", "fedsa", r=16))
    for round_ in (1, 2):
        for client in CLIENTS:
            sent = sent_tensors(layout, round_, client)
            assert ROLE_LAMBDA_D in roles(sent)
            assert not roles(sent) & {ROLE_LAMBDA_B, ROLE_PROJECTION}
    kept = {c: storage.latest_state(layout.state(c), before_round=3).tensors() for c in CLIENTS}
    assert all(roles(k) == {ROLE_LAMBDA_B} for k in kept.values())
    name = next(iter(kept["client-0"]))
    assert not torch.equal(kept["client-0"][name], kept["client-1"][name])
    # lambda_d is averaged; the global's lambda_b is still the zero init.
    g0, g2 = global_tensors(layout, 0), global_tensors(layout, 2)
    assert any(not torch.equal(g2[n], g0[n]) for n in g0 if role_of(n) == ROLE_LAMBDA_D)
    assert all(float(g2[n].abs().sum()) == 0 for n in g0 if role_of(n) == ROLE_LAMBDA_B)


def test_ffa_vera_keeps_lambda_d_and_projections_bit_identical(kind_recipe, cached_federation):
    layout = cached_federation(kind_recipe("vera", "ffa", r=16))
    g0 = global_tensors(layout, 0)
    frozen = {n: t for n, t in g0.items() if role_of(n) in (ROLE_LAMBDA_D, ROLE_PROJECTION)}
    assert roles(frozen) == {ROLE_LAMBDA_D, ROLE_PROJECTION}
    for round_ in (1, 2):
        g = global_tensors(layout, round_)
        assert all(torch.equal(g[n], t) for n, t in frozen.items())
        for client in CLIENTS:
            assert roles(sent_tensors(layout, round_, client)) == {ROLE_LAMBDA_B, ROLE_HEAD}
    assert any(float(t.abs().sum()) > 0 for n, t in global_tensors(layout, 2).items() if role_of(n) == ROLE_LAMBDA_B)
    m0 = storage.read_global(layout.global_checkpoint(0)).manifest
    assert m0.frozen_digest == storage.read_global(layout.global_checkpoint(2)).manifest.frozen_digest


def test_vera_update_is_much_smaller_than_lora(kind_recipe, cached_federation):
    vera = cached_federation(kind_recipe("vera", "fedavg", r=16))
    lora = cached_federation(kind_recipe("lora", "fedavg", r=4))
    size = lambda layout: storage.read_update(layout.update(1, "client-0")).manifest.bytes
    assert size(vera) < size(lora) / 2


def test_training_is_reproducible(make_recipe, cached_federation, run_federation):
    a = cached_federation(make_recipe("fedsa"))  # simulated once for the session; b afresh here
    b = run_federation(make_recipe("fedsa"), "b")
    for client in CLIENTS:
        ma = storage.read_update(a.update(2, client)).manifest
        mb = storage.read_update(b.update(2, client)).manifest
        assert ma.tensor_digests == mb.tensor_digests
    assert storage.read_global(a.global_checkpoint(2)).manifest.digest == storage.read_global(
        b.global_checkpoint(2)
    ).manifest.digest


runner = CliRunner()


def test_a_logit_adjusted_update_trained_by_hand_is_the_one_simulate_trained(federation_of, tmp_path):
    """train-client and simulate reach the client's label prior through the same code: client-0's round-1 update
    by hand is simulate's, bit for bit; and the adjustment is in it (the plain federation's update differs)."""
    import numpy as np
    import pandas as pd

    adjusted, plain = federation_of("ffa", training={"logit_adjustment": 1.0}), federation_of("ffa")
    labels = pd.read_parquet(adjusted.data / "client-0.parquet")["sentiment"]
    assert abs(float(np.mean(labels == "pos")) - 0.5) > 0.1, "client-0's shard must be skewed for the test to mean it"
    result = runner.invoke(app, ["train-client", str(adjusted.global_checkpoint(0)), "--data",
                                 str(adjusted.data / "client-0.parquet"), "--state", str(tmp_path / "client-0"),
                                 "--out", str(tmp_path / "u")])
    assert result.exit_code == 0, result.output
    by_hand = load_file(str(tmp_path / "u" / storage.UPDATE_TENSORS))
    simulated, unadjusted = update_tensors(adjusted, 1, "client-0"), update_tensors(plain, 1, "client-0")
    assert by_hand.keys() == simulated.keys() and all(torch.equal(by_hand[n], simulated[n]) for n in by_hand)
    assert any(not torch.equal(by_hand[n], unadjusted[n]) for n in by_hand)


@pytest.mark.parametrize("failing", [storage.UPDATE_TENSORS, storage.STATE_TENSORS])
def test_a_round_whose_update_or_state_cannot_be_written_leaves_neither_and_no_ledger_entry(
        failing, tmp_path, tiny_model_dir, reviews_csv, partition_dir, monkeypatch):
    """The disk full while the update or the state is written: nothing was sent, so no ledger counts the round, and
    the same call succeeds afterwards with one entry (before, the state was written first and counted a round
    whose update never existed, and the rerun was refused as 'already trained')."""
    import errno

    from fedlora_cli.storage import checkpoints

    raw = private_recipe(tiny_model_dir, reviews_csv, noise_multiplier=1.0)
    federation.init(recipes.from_dict(raw), tmp_path / "g0",
                    partition=json.loads((partition_dir / "partition.json").read_text()))
    save = checkpoints.save_tensors

    def full_disk(path, tensors):
        if Path(path).name == failing:
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(path, tensors)

    monkeypatch.setattr(checkpoints, "save_tensors", full_disk)
    train = (tmp_path / "g0", partition_dir / "client-0.parquet", tmp_path / "state", tmp_path / "u", "client-0")
    with pytest.raises(FedloraError, match="could not write .*: No space left on device .*nothing written"):
        federation.train_client(*train)
    assert not (tmp_path / "u").exists() and storage.state_rounds(tmp_path / "state") == []
    assert [p.name for p in tmp_path.rglob(".*")] == []  # no temporary folder left

    monkeypatch.setattr(checkpoints, "save_tensors", save)
    federation.train_client(*train)
    ledger = storage.latest_state(tmp_path / "state").manifest.privacy
    assert len(ledger["history"]) == 1 and ledger["epsilon"] > 0


def test_round_over_budget_is_refused_and_writes_nothing(tmp_path, tiny_model_dir, reviews_csv, partition_dir):
    raw = private_recipe(tiny_model_dir, reviews_csv, noise_multiplier=1.6, target_epsilon=3.0)
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text(yaml.safe_dump(raw))
    assert runner.invoke(app, ["init", str(recipe_path), "--data", str(partition_dir), "--out", str(tmp_path / "g0")]).exit_code == 0
    state = tmp_path / "client-0"
    for round_ in range(1, 20):
        out = tmp_path / f"u{round_}"
        result = runner.invoke(app, ["train-client", str(tmp_path / f"g{round_ - 1}"), "--data",
                                     str(partition_dir / "client-0.parquet"), "--state", str(state), "--out", str(out)])
        if result.exit_code != 0:
            break
        runner.invoke(app, ["aggregate", str(tmp_path / f"g{round_ - 1}"), str(out), "--out", str(tmp_path / f"g{round_}")])
    assert result.exit_code == 1 and "privacy budget" in result.output and "Traceback" not in result.output
    assert not out.exists()
    assert not (state / storage.round_dirname(round_)).exists()
    spent = storage.latest_state(state, 10**6).manifest.privacy["epsilon"]
    assert round_ > 1 and spent <= 3.0


def test_ledger_from_another_recipe_is_refused(tmp_path, tiny_model_dir, reviews_csv, partition_dir):
    for k, eps in enumerate((3.0, 4.0)):
        raw = private_recipe(tiny_model_dir, reviews_csv, noise_multiplier=2.0, target_epsilon=eps)
        (tmp_path / f"r{k}.yaml").write_text(yaml.safe_dump(raw))
        result = runner.invoke(app, ["init", str(tmp_path / f"r{k}.yaml"), "--data", str(partition_dir), "--out", str(tmp_path / f"g{k}")])
        assert result.exit_code == 0, result.output
    args = ["--data", str(partition_dir / "client-0.parquet"), "--state", str(tmp_path / "client-0")]
    assert runner.invoke(app, ["train-client", str(tmp_path / "g0"), *args, "--out", str(tmp_path / "u0")]).exit_code == 0
    result = runner.invoke(app, ["train-client", str(tmp_path / "g1"), *args, "--out", str(tmp_path / "u1")])
    assert result.exit_code == 1 and "different recipe" in result.output
    assert not (tmp_path / "u1").exists()


def test_retraining_a_round_keeps_its_spending(tmp_path, tiny_model_dir, reviews_csv, partition_dir):
    raw = private_recipe(tiny_model_dir, reviews_csv, noise_multiplier=1.0)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    assert runner.invoke(app, ["init", str(tmp_path / "r.yaml"), "--data", str(partition_dir), "--out", str(tmp_path / "g0")]).exit_code == 0
    args = ["train-client", str(tmp_path / "g0"), "--data", str(partition_dir / "client-0.parquet"),
            "--state", str(tmp_path / "client-0"), "--out", str(tmp_path / "u")]
    first = runner.invoke(app, args)
    assert first.exit_code == 0 and "noise multiplier 1.0000 this round" in first.output, first.output
    again = runner.invoke(app, [*args[:-1], str(tmp_path / "u-again")])
    assert again.exit_code == 1 and "already trained round 1" in again.output
    assert not (tmp_path / "u-again").exists()
    assert runner.invoke(app, [*args, "--overwrite"]).exit_code == 0
    ledger = storage.latest_state(tmp_path / "client-0", 10**6).manifest.privacy
    assert len(ledger["history"]) == 2, "the first attempt's spending is still counted"


# The ClientRound train_client returns ---------------------------------------------------------------------------


def test_train_client_returns_the_update_and_state_it_wrote(make_recipe, partition_dir, tmp_path):
    from fedlora_cli.federation import ClientRound

    g0 = federation.init(make_recipe("fedsa"), tmp_path / "g0",
                         partition=json.loads((partition_dir / "partition.json").read_text()))
    state_dir, out = tmp_path / "state", tmp_path / "u1"

    result = federation.train_client(g0, partition_dir / "client-0.parquet", state_dir, out, "client-0")

    assert isinstance(result, ClientRound)
    # The state is the one on disk: the round-1 folder, its manifest as written, the tensors FedSA keeps (B).
    on_disk = storage.latest_state(state_dir)
    assert result.state.path == on_disk.path == state_dir / storage.round_dirname(1)
    assert result.state.manifest == on_disk.manifest
    kept = result.state.tensors()
    assert kept and all(role_of(n) == "lora_B" for n in kept)
    assert {n: storage.tensor_digest(t) for n, t in kept.items()} == result.state.manifest.tensor_digests
    assert result.state.manifest.client_id == "client-0" and result.state.manifest.round == 1
    assert result.state.manifest.parent_digest == g0.manifest.digest
    # The update is the one on disk too: only what FedSA sends (A and the shared head), never B.
    assert result.update.path == out and result.update.manifest == storage.read_update(out).manifest
    sent = load_file(str(out / storage.UPDATE_TENSORS))
    assert {role_of(n) for n in sent} == {"lora_A", ROLE_HEAD}
    assert set(sent) == set(result.update.manifest.tensor_digests) and not set(sent) & set(kept)
    assert result.update.manifest.bytes == (out / storage.UPDATE_TENSORS).stat().st_size


def test_a_site_trains_with_its_threads_setting_and_the_update_records_the_count(make_recipe, partition_dir, tmp_path):
    """training.threads (a site setting): torch computes the round with that many CPU threads, the update's site
    record says how many it computed with, and the process gets its own count back (a worker serves on)."""
    g0 = federation.init(make_recipe("ffa"), tmp_path / "g0",
                         partition=json.loads((partition_dir / "partition.json").read_text()))
    own = torch.get_num_threads()
    other = 1 if own > 1 else 2
    seen: list[int] = []
    result = federation.train_client(g0, partition_dir / "client-0.parquet", tmp_path / "s1", tmp_path / "u1",
                                     "client-0", site={"training.threads": other},
                                     progress=lambda *_: seen.append(torch.get_num_threads()))
    assert seen and set(seen) == {other}
    assert result.update.manifest.site["threads"] == other and torch.get_num_threads() == own
    again = federation.train_client(g0, partition_dir / "client-0.parquet", tmp_path / "s2", tmp_path / "u2",
                                    "client-0")
    assert again.update.manifest.site["threads"] == own
