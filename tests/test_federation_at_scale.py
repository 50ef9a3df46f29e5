"""Federations of many sites: client sampling, partial participation, server optimisers, FedProx, pruning."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from conftest import QuietReporter, recipe_dict
from opacus.accountants import RDPAccountant
from safetensors.torch import load_file
from typer.testing import CliRunner

from fedlora_cli import federation, recipe as recipes, storage
from fedlora_cli.adapters.methods import plan
from fedlora_cli.aggregation import Aggregate, Contributions, RoundSpec, Strategy
from fedlora_cli.aggregation.server_optimizers import FedAdam, FedAvgM, FedYogi, state_name
from fedlora_cli.cli import app
from fedlora_cli.data.examples import read_shard
from fedlora_cli.errors import FedloraError
from fedlora_cli.federation import sampling, simulate
from fedlora_cli.model.training import local_train
from fedlora_cli.model.workbench import build

runner = CliRunner()


@pytest.fixture
def scaled(tiny_model_dir, reviews_csv):
    """A tiny federation recipe with federation (and training) keys replaced."""

    def make(method: str = "fedavg", training: dict | None = None, **federation_keys):
        raw = recipe_dict(tiny_model_dir, reviews_csv, method, **(training or {}))
        raw["federation"].update(federation_keys)
        return recipes.from_dict(raw)

    return make


def run(recipe, path: Path, **options) -> storage.RunLayout:
    simulate.simulate(recipe, path, QuietReporter(), **options)
    return storage.RunLayout(path)


def folder_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(folder).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


# sampling -----------------------------------------------------------------------------------------------


def test_sampling_is_seeded_sized_and_differs_between_rounds(scaled):
    f = scaled(clients=3).federation
    f = recipes.FederationSection(**{**f.__dict__, "clients": 10, "clients_per_round": 4})
    first = [sampling.asked(f, seed=0, round_=r) for r in range(1, 6)]
    assert first == [sampling.asked(f, seed=0, round_=r) for r in range(1, 6)]
    assert all(len(a) == 4 and len(set(a)) == 4 for a in first)
    assert len({tuple(a) for a in first}) > 1, "every round drew the same clients"
    assert first != [sampling.asked(f, seed=1, round_=r) for r in range(1, 6)]
    ids = sampling.population(f)
    assert all(a == sorted(a, key=ids.index) for a in first)  # population order


def test_poisson_sampling_asks_each_client_at_the_rate():
    f = recipes.FederationSection(clients=200, clients_per_round=50, sampling="poisson")
    counts = [len(sampling.asked(f, seed=0, round_=r)) for r in range(1, 41)]
    assert sampling.sample_rate(f) == 0.25
    assert 45 < sum(counts) / len(counts) < 55 and len(set(counts)) > 1  # about q N, not a fixed size


def test_a_sampled_run_trains_only_the_asked_clients_and_records_them(scaled, tmp_path):
    recipe = scaled(clients=3, clients_per_round=2)
    layout = run(recipe, tmp_path / "run")
    for round_ in (1, 2):
        m = storage.read_global(layout.global_checkpoint(round_)).manifest
        expected = sampling.asked(recipe.federation, recipe.training.seed, round_)
        assert m.asked == expected and m.clients == expected and len(expected) == 2
        trained = sorted(p.name for p in (layout.root / "updates" / storage.round_dirname(round_)).iterdir())
        assert trained == expected


def test_a_client_that_sits_a_round_out_keeps_its_state_untouched(scaled, tmp_path):
    recipe = scaled("fedsa", clients=3, clients_per_round=2, rounds=3)  # FedSA: each client keeps its own B
    root = tmp_path / "run"
    snapshots = {}

    class Snapshot(QuietReporter):
        def round_done(self, row):
            states = root / storage.CLIENTS_DIR
            snapshots[row["round"]] = {d.name: folder_digest(d) for d in states.iterdir()} if states.is_dir() else {}

    simulate.simulate(recipe, root, Snapshot())
    for r in (2, 3):
        asked = sampling.asked(recipe.federation, recipe.training.seed, r)
        for cid, digest in snapshots[r - 1].items():
            if cid in asked:
                assert snapshots[r][cid] != digest, f"{cid} was asked in round {r} but its state did not change"
            else:
                assert snapshots[r][cid] == digest, f"{cid} sat round {r} out but its state changed"
    idle = [(r, c) for r in (2, 3) for c in snapshots[r - 1] if c not in sampling.asked(recipe.federation, 0, r)]
    assert idle, "no client sat a round out in this draw"


def test_aggregate_refuses_a_client_the_round_did_not_ask(scaled, tmp_path):
    recipe = scaled(clients=3)
    layout = run(recipe, tmp_path / "run")
    sampled = recipes.from_dict({**recipe.to_dict(), "federation": {**recipe.to_dict()["federation"],
                                                                   "clients_per_round": 1}})
    g0 = federation.init(sampled, tmp_path / "g0", partition=json.loads((layout.data / "partition.json").read_text()))
    asked = sampling.asked(sampled.federation, sampled.training.seed, 1)
    other = next(c for c in ("client-0", "client-1", "client-2") if c not in asked)
    update = federation.train_client(g0, layout.data / f"{other}.parquet", tmp_path / "state", tmp_path / "u", other)
    out = tmp_path / "g1"
    result = runner.invoke(app, ["aggregate", str(g0.path), str(update.update.path), "--out", str(out)])
    assert result.exit_code == 1 and "did not ask" in result.output and other in result.output
    assert not out.exists()


def test_fewer_updates_than_min_clients_is_one_line_and_writes_nothing(scaled, tmp_path):
    layout = run(scaled(clients=3), tmp_path / "run")
    g0 = layout.global_checkpoint(0)
    raw = json.loads((g0 / storage.GLOBAL_MANIFEST).read_text())
    raw["recipe"]["federation"]["min_clients"] = 3
    strict = tmp_path / "strict-g0"
    storage.write_global(strict, storage.GlobalManifest(**raw), load_file(str(g0 / storage.ADAPTER_WEIGHTS)),
                         json.loads((g0 / storage.ADAPTER_CONFIG).read_text()))
    # The updates name their parent by digest, which the copy keeps: only min_clients differs.
    two = [str(layout.update(1, c)) for c in ("client-0", "client-1")]
    out = tmp_path / "g1"
    result = runner.invoke(app, ["aggregate", str(strict), *two, "--out", str(out)])
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert "fewer than federation.min_clients = 3" in result.output and "Traceback" not in result.output
    assert not out.exists()
    ok = runner.invoke(app, ["aggregate", str(strict), *two, str(layout.update(1, "client-2")), "--out", str(out)])
    assert ok.exit_code == 0, ok.output


@pytest.mark.parametrize(
    "federation_keys, extra, needle",
    [
        ({"clients_per_round": 4}, {}, "federation.clients_per_round"),
        ({"sampling": "poisson"}, {}, "needs federation.clients_per_round"),
        ({"clients_per_round": 2, "min_clients": 3}, {}, "federation.min_clients"),
        ({"clients_per_round": 2}, {"server_privacy": {"clip_norm": 1.0, "noise_multiplier": 1.0}}, "'poisson'"),
        ({"server_optimizer": "fedadam", "aggregation": "svd"}, {}, "federation.server_optimizer"),
        ({"client_ids": ["a", "a", "b"]}, {}, "must not repeat"),
    ],
)
def test_participation_settings_are_validated_by_key(tiny_model_dir, reviews_csv, federation_keys, extra, needle):
    raw = recipe_dict(tiny_model_dir, reviews_csv)
    raw["federation"].update(federation_keys)
    raw.update(extra)
    with pytest.raises(FedloraError, match=needle):
        recipes.from_dict(raw)


# DP-FedAvg with sampling ----------------------------------------------------------------------------------


def test_dp_fedavg_under_poisson_sampling_is_accounted_at_the_sampling_rate(scaled, tmp_path):
    recipe = scaled(clients=3, clients_per_round=2, sampling="poisson", rounds=1)
    recipe = recipes.from_dict({**recipe.to_dict(), "server_privacy": {"clip_norm": 0.5, "noise_multiplier": 1.2}})
    layout = run(recipe, tmp_path / "run")
    m = storage.read_global(layout.global_checkpoint(1)).manifest
    q = 2 / 3
    assert m.server_privacy_ledger == [[1.2, q, 1]]
    report = runner.invoke(app, ["privacy", "report", str(layout.global_checkpoint(1)), "--json"])
    reported = json.loads(report.stdout)[0]["epsilon"]
    independent = RDPAccountant()
    independent.step(noise_multiplier=1.2, sample_rate=q)
    assert reported == pytest.approx(independent.get_epsilon(delta=1e-5), rel=1e-9)
    everyone = RDPAccountant()
    everyone.step(noise_multiplier=1.2, sample_rate=1.0)
    assert reported < everyone.get_epsilon(delta=1e-5)  # amplification by sampling


# server optimisers --------------------------------------------------------------------------------------


class Fixed(Strategy):
    """An inner strategy whose aggregate is given (the hand-made tensors of a round)."""

    name = "mean"

    def __init__(self, tensors):
        self.tensors = tensors

    def aggregate(self, contributions, spec):
        return Aggregate(dict(self.tensors))


def spec_for(reference) -> RoundSpec:
    return RoundSpec(sorted(reference), None, 16.0, 8, lambda c: 8, reference)


def test_fedavgm_step_equals_the_hand_computation():
    x = {"w": torch.tensor([1.0, -2.0, 0.5])}
    agg1, agg2 = torch.tensor([1.5, -2.5, 0.5]), torch.tensor([2.0, -3.0, 1.5])
    opt = FedAvgM(Fixed({"w": agg1}), lr=0.5, beta1=0.9, beta2=0.0, tau=1.0)
    first = opt.aggregate(Contributions([]), spec_for(x))
    delta1 = agg1 - x["w"]
    torch.testing.assert_close(first.tensors["w"], x["w"] + 0.5 * delta1)
    x2 = {"w": first.tensors["w"]}
    opt2 = FedAvgM(Fixed({"w": agg2}), lr=0.5, beta1=0.9, beta2=0.0, tau=1.0, state=first.server_state)
    second = opt2.aggregate(Contributions([]), spec_for(x2))
    v = 0.9 * delta1 + (agg2 - x2["w"])
    torch.testing.assert_close(second.tensors["w"], x2["w"] + 0.5 * v)
    torch.testing.assert_close(second.server_state[state_name("momentum", "w")], v)


def test_fedadam_and_fedyogi_steps_equal_the_hand_computation():
    x = {"w": torch.tensor([0.2, -0.1, 0.0, 1.0])}
    agg = torch.tensor([0.3, -0.4, 0.0, 1.1])
    delta = agg - x["w"]
    lr, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    m = (1 - b1) * delta
    adam = FedAdam(Fixed({"w": agg}), lr, b1, b2, tau).aggregate(Contributions([]), spec_for(x))
    v_adam = b2 * tau**2 + (1 - b2) * delta**2
    torch.testing.assert_close(adam.tensors["w"], x["w"] + lr * m / (v_adam.sqrt() + tau))
    yogi = FedYogi(Fixed({"w": agg}), lr, b1, b2, tau).aggregate(Contributions([]), spec_for(x))
    v0 = torch.full_like(delta, tau**2)
    v_yogi = v0 - (1 - b2) * delta**2 * torch.sign(v0 - delta**2)
    torch.testing.assert_close(yogi.tensors["w"], x["w"] + lr * m / (v_yogi.sqrt() + tau))
    torch.testing.assert_close(adam.server_state[state_name("variance", "w")], v_adam)
    assert not torch.equal(adam.tensors["w"], yogi.tensors["w"])  # the two second moments differ


def test_fedavgm_without_momentum_at_rate_one_is_plain_fedavg(scaled, tmp_path):
    plain = run(scaled(clients=3, rounds=2), tmp_path / "plain")
    avgm = run(scaled(clients=3, rounds=2, server_optimizer="fedavgm", server_momentum=0.0, server_lr=1.0),
               tmp_path / "avgm")
    for r in (1, 2):
        a = load_file(str(plain.global_checkpoint(r) / storage.ADAPTER_WEIGHTS))
        b = load_file(str(avgm.global_checkpoint(r) / storage.ADAPTER_WEIGHTS))
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-7)


def test_server_optimizer_state_resumes_from_the_checkpoint_exactly(scaled, tmp_path):
    """Round 2 aggregated again in a fresh call, from the files alone, equals the simulation's round 2."""
    recipe = scaled(clients=3, rounds=2, server_optimizer="fedadam")
    layout = run(recipe, tmp_path / "run")
    g1 = storage.read_global(layout.global_checkpoint(1))
    assert g1.manifest.server_state_digests and (g1.path / storage.SERVER_STATE_TENSORS).is_file()
    again = federation.aggregate_round(layout.global_checkpoint(1), [layout.update(2, c) for c in
                                                                      ("client-0", "client-1", "client-2")],
                                       tmp_path / "g2-again")
    simulated = storage.read_global(layout.global_checkpoint(2)).manifest
    assert again.checkpoint.manifest.digest == simulated.digest
    assert again.checkpoint.manifest.server_state_digests == simulated.server_state_digests


def test_server_optimizer_moves_only_what_the_method_sends(scaled, tmp_path):
    layout = run(scaled("ffa", clients=3, rounds=1, server_optimizer="fedadam"), tmp_path / "run")
    g0 = load_file(str(layout.global_checkpoint(0) / storage.ADAPTER_WEIGHTS))
    g1 = load_file(str(layout.global_checkpoint(1) / storage.ADAPTER_WEIGHTS))
    state = load_file(str(layout.global_checkpoint(1) / storage.SERVER_STATE_TENSORS))
    p = plan("ffa", "shared")
    for name in g0:
        if p.sends(name):
            assert state_name("momentum", name) in state
        else:  # FFA's A is frozen
            assert torch.equal(g0[name], g1[name]) and state_name("momentum", name) not in state


def test_a_tampered_server_state_is_refused(scaled, tmp_path):
    layout = run(scaled(clients=3, rounds=1, server_optimizer="fedavgm"), tmp_path / "run")
    path = layout.global_checkpoint(1) / storage.SERVER_STATE_TENSORS
    state = load_file(str(path))
    from safetensors.torch import save_file

    save_file({k: v + 1 for k, v in state.items()}, str(path))
    with pytest.raises(FedloraError, match="server state does not match"):
        federation.aggregate_round(layout.global_checkpoint(1), [layout.update(1, "client-0")], tmp_path / "x")


# FedProx ------------------------------------------------------------------------------------------------


def _train(make_recipe, partition_dir, mu: float):
    recipe = make_recipe("fedavg", proximal_mu=mu, lr=0.05)
    bench = build(recipe, 2)
    start = bench.adapter_tensors()
    examples = read_shard(partition_dir / "client-0.parquet", "text", "sentiment", 2)
    local_train(bench, plan("fedavg", "shared"), examples, seed=0)
    return start, bench.adapter_tensors()


def test_fedprox_with_mu_zero_is_plain_training_and_mu_pulls_toward_the_global(make_recipe, partition_dir):
    start, plain = _train(make_recipe, partition_dir, 0.0)
    _, zero = _train(make_recipe, partition_dir, 0.0)
    _, pulled = _train(make_recipe, partition_dir, 50.0)
    for name in plain:
        assert torch.equal(plain[name], zero[name])

    def distance(tensors):
        return sum(float((tensors[n] - start[n]).norm() ** 2) for n in tensors) ** 0.5

    assert distance(plain) > 0
    assert distance(pulled) < 0.8 * distance(plain)


def test_fedprox_leaves_what_the_client_keeps_alone(make_recipe, partition_dir, monkeypatch):
    """FedSA's B stays home: the proximal anchor holds only the tensors the client sends."""
    from fedlora_cli.model import training

    anchors = []
    real = training._proximal_anchor
    monkeypatch.setattr(training, "_proximal_anchor", lambda bench, p: anchors.append(real(bench, p)) or anchors[-1])
    recipe = make_recipe("fedsa", proximal_mu=1.0)
    bench = build(recipe, 2)
    examples = read_shard(partition_dir / "client-0.parquet", "text", "sentiment", 2)
    local_train(bench, plan("fedsa", "shared"), examples, seed=0)
    names = {n for n, p in bench.model.named_parameters() if any(p is a for a, _ in anchors[0])}
    assert names and all("lora_B" not in n for n in names) and any("lora_A" in n for n in names)


# run folder growth ----------------------------------------------------------------------------------------


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
