"""fedlora_cli.privacy.accounting: epsilon, calibration and client plans; the budget a DP federation spends, checked
against an independent Opacus accountant."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from conftest import exact_gaussian_epsilon, private_recipe
from opacus.accountants import create_accountant
from safetensors.torch import load_file
from typer.testing import CliRunner

from fedlora_cli import privacy, recipe as recipes, storage
from fedlora_cli.adapters.roles import role_of
from fedlora_cli.cli import app
from fedlora_cli.data.examples import read_shard

runner = CliRunner()


def test_dp_federation_moves_b_keeps_a_and_accumulates_epsilon(tmp_path, tiny_model_dir, reviews_csv, cached_federation):
    r = recipes.from_dict(private_recipe(tiny_model_dir, reviews_csv, target_epsilon=8.0))
    layout = cached_federation(r)
    g0 = load_file(str(layout.global_checkpoint(0) / storage.ADAPTER_WEIGHTS))
    g2 = load_file(str(layout.global_checkpoint(2) / storage.ADAPTER_WEIGHTS))
    assert all(torch.equal(g2[n], t) for n, t in g0.items() if role_of(n) == "lora_A")
    assert any(not torch.equal(g2[n], t) for n, t in g0.items() if role_of(n) == "lora_B")
    sigma = storage.read_global(layout.global_checkpoint(0)).manifest.recipe["privacy"]["noise_multiplier"]
    assert sigma > 0
    for client in ("client-0", "client-1", "client-2"):
        m1 = storage.read_update(layout.update(1, client)).manifest.privacy
        m2 = storage.read_update(layout.update(2, client)).manifest.privacy
        assert 0 < m1["epsilon"] < m2["epsilon"] <= 8.0
        assert m2["remaining"] == pytest.approx(8.0 - m2["epsilon"])
    # The noise was calibrated so that the planned federation spends (almost exactly) the budget.
    largest = max(storage.read_update(layout.update(2, c)).manifest.privacy["epsilon"] for c in ("client-0", "client-1", "client-2"))
    assert largest == pytest.approx(8.0, rel=0.02)
    # Nothing un-noised leaves a client: no training loss, and the shard size rather than the count of examples
    # the secret Poisson sampling drew. The client keeps its loss at home.
    for client in ("client-0", "client-1", "client-2"):
        m = storage.read_update(layout.update(2, client)).manifest
        assert m.loss is None
        assert m.num_examples == m.shard_examples
        state_loss = storage.latest_state(layout.state(client), 10**6).manifest.loss
        assert isinstance(state_loss, float) and np.isfinite(state_loss)


def test_each_client_calibrated_to_its_own_size_spends_its_whole_budget(tiny_model_dir, reviews_csv, cached_federation):
    """privacy.calibration 'client': no sigma in the global checkpoint; each client's ledger holds the sigma its own
    plan needs, so every client (not only the smallest) ends the planned federation at the budget, and the
    smallest client's sigma is the one a shared calibration would give everyone."""
    r = recipes.from_dict(private_recipe(tiny_model_dir, reviews_csv, target_epsilon=8.0, calibration="client"))
    layout = cached_federation(r)
    assert storage.read_global(layout.global_checkpoint(0)).manifest.recipe["privacy"]["noise_multiplier"] is None
    sizes = {c["id"]: c["examples"] for c in json.loads((layout.data / "partition.json").read_text())["clients"]}
    assert len(set(sizes.values())) == len(sizes), "the clients' shards must differ in size for the test to mean it"
    plans = {cid: privacy.client_plan(n, 8, 3, None) for cid, n in sizes.items()}
    own = {cid: privacy.calibrate_noise(r.privacy, [plan], 2) for cid, plan in plans.items()}
    for cid in sizes:
        ledger = storage.latest_state(layout.state(cid), 10**6).manifest.privacy
        assert [entry[0] for entry in ledger["history"]] == [own[cid]] * 2, cid
        assert ledger["epsilon"] == pytest.approx(8.0, rel=0.02) and ledger["epsilon"] <= 8.0, cid
    smallest, largest = min(sizes, key=sizes.get), max(sizes, key=sizes.get)
    assert own[smallest] == privacy.calibrate_noise(r.privacy, list(plans.values()), 2)
    assert own[largest] < own[smallest]


def test_dp_with_local_epochs_runs_the_steps_it_calibrated_for(tmp_path, tiny_model_dir, reviews_csv, cached_federation):
    # 1.1 x 50 / 5 is 11.000000000000002 in floating point: calibration and training must both count 11 steps.
    assert privacy.client_plan(50, 5, None, 1.1).steps_per_round == 11
    raw = private_recipe(tiny_model_dir, reviews_csv, target_epsilon=4.0)
    raw["training"]["local_steps"] = None
    raw["training"]["local_epochs"] = 0.7
    raw["federation"]["rounds"] = 3
    layout = cached_federation(recipes.from_dict(raw))
    part = json.loads((layout.data / "partition.json").read_text())
    for c in part["clients"]:
        planned = privacy.client_plan(c["examples"], 8, None, 0.7).steps_per_round
        ledger = storage.latest_state(layout.state(c["id"]), 10**6).manifest.privacy
        assert [entry[2] for entry in ledger["history"]] == [planned] * 3
        assert ledger["epsilon"] <= 4.0


def test_epsilon_across_processes_matches_an_independent_accountant(tmp_path, tiny_model_dir, reviews_csv, partition_dir):
    raw = private_recipe(tiny_model_dir, reviews_csv, noise_multiplier=1.1, accountant="rdp")
    raw["federation"]["rounds"] = 3
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text(yaml.safe_dump(raw))

    def cli(*args):
        proc = subprocess.run([sys.executable, "-m", "fedlora_cli", *map(str, args)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    cli("init", recipe_path, "--data", partition_dir, "--out", tmp_path / "g0")
    shard = partition_dir / "client-0.parquet"
    for round_ in (1, 2, 3):
        info = json.loads(cli("train-client", tmp_path / f"g{round_ - 1}", "--data", shard, "--state", tmp_path / "client-0",
                              "--out", tmp_path / f"u{round_}", "--json"))
        cli("aggregate", tmp_path / f"g{round_ - 1}", tmp_path / f"u{round_}", "--out", tmp_path / f"g{round_}")
    n = len(read_shard(shard, "text", "sentiment", 2))
    accountant = create_accountant(mechanism="rdp")
    for _ in range(3):
        for _ in range(raw["training"]["local_steps"]):
            accountant.step(noise_multiplier=1.1, sample_rate=raw["training"]["batch_size"] / n)
    independent = accountant.get_epsilon(delta=1e-3)
    assert info["privacy"]["epsilon"] == pytest.approx(independent, rel=0.01)
    report = json.loads(cli("privacy", "report", tmp_path / "client-0", "--json"))
    assert len(report[0]["history"]) == 3 and report[0]["epsilon"] == pytest.approx(independent, rel=0.01)


def test_delta_too_large_for_the_client(tmp_path, tiny_model_dir, reviews_csv, partition_dir):
    raw = private_recipe(tiny_model_dir, reviews_csv, target_epsilon=3.0)
    raw["privacy"]["delta"] = 0.05
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text(yaml.safe_dump(raw))
    result = runner.invoke(app, ["init", str(recipe_path), "--data", str(partition_dir), "--out", str(tmp_path / "g0")])
    assert result.exit_code == 1 and "privacy.delta" in result.output and "1/n" in result.output
    assert not (tmp_path / "g0").exists()


def test_delta_too_large_with_an_explicit_noise_multiplier_is_refused_by_init_which_knows_n(
        tmp_path, tiny_model_dir, reviews_csv, partition_dir):
    """Issue 28: with privacy.noise_multiplier set (nothing to calibrate) init --data passed, and only train-client
    refused, after the federation had started."""
    from cli.helpers import fails

    raw = private_recipe(tiny_model_dir, reviews_csv, noise_multiplier=1.0)
    raw["privacy"]["delta"] = 0.05
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text(yaml.safe_dump(raw))
    fails(["init", recipe_path, "--data", partition_dir, "--out", tmp_path / "g0"],
          "privacy.delta 0.05 must be smaller than 1/n", "for client 'client-")
    assert not (tmp_path / "g0").exists()


# DP-FedAvg with every client in every round: exact Gaussian composition ---------------------------------------


@pytest.mark.parametrize("releases", [[(1.0, 10)], [(0.7, 1)], [(2.0, 3), (1.2, 2)], [(5.0, 40)]])
def test_unsampled_gaussian_releases_compose_to_the_exact_gaussian_figure(releases):
    history = [(sigma, 1.0, count) for sigma, count in releases]
    exact = privacy.epsilon(history, 1e-5, "gaussian")
    assert exact == pytest.approx(exact_gaussian_epsilon(releases, 1e-5), rel=1e-4)
    assert exact < privacy.epsilon(history, 1e-5, "rdp")  # RDP over-states the same releases


def test_the_issues_example_sigma_1_ten_releases():
    assert privacy.epsilon([(1.0, 1.0, 10)], 1e-5, "gaussian") == pytest.approx(17.86, abs=0.005)
    assert privacy.epsilon([(1.0, 1.0, 10)], 1e-5, "rdp") == pytest.approx(19.05, abs=0.01)


def test_dp_fedavg_epsilon_takes_every_release_at_q_1_and_the_gaussian_accountant_refuses_sampling():
    sampled = [(1.0, 1.0, 1), (1.0, 0.5, 1)]
    assert privacy.server_epsilon(sampled, 1e-5) == privacy.epsilon([(1.0, 1.0, 2)], 1e-5, "gaussian")
    with pytest.raises(ValueError, match="without sampling"):
        privacy.epsilon([(1.0, 0.5, 1)], 1e-5, "gaussian")
