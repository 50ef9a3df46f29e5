"""Differential privacy: DP-SGD correctness with PEFT, ledgers across processes, DP-FedAvg, budget refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import recipe_dict
from opacus.accountants import create_accountant
from safetensors.torch import load_file
from typer.testing import CliRunner

from fedlora_cli import aggregation, federation, privacy, recipe as recipes, storage
from fedlora_cli.adapters.methods import plan
from fedlora_cli.adapters.roles import role_of
from fedlora_cli.cli import app
from fedlora_cli.data.examples import encode, read_shard
from fedlora_cli.model.training import DPSettings, local_train
from fedlora_cli.model.workbench import build

runner = CliRunner()


def private_recipe(model_dir, data, method="ffa", head="shared", **privacy_section):
    raw = recipe_dict(model_dir, data, method, head, optimizer="sgd", lr=0.5)
    raw["privacy"] = {"max_grad_norm": 1.0, "delta": 1e-3, **privacy_section}
    return raw


def one_step_delta(bench, p, batch, dp_engine=None):
    """Parameter change of one optimizer step on ``batch``, plainly or through a DP engine."""
    from fedlora_cli.model.training import make_optimizer
    from fedlora_cli.privacy.dp_sgd import DPSGD

    params = bench.set_trainable(p)
    before = [q.detach().clone() for q in params]
    optimizer = make_optimizer(bench, params)
    model = bench.model
    engine = None
    if dp_engine is not None:
        engine = DPSGD(model, optimizer, *dp_engine, expected_batch=len(batch["labels"]), seed=0)
        model, optimizer = engine.module, engine.optimizer
    model.train()
    torch.manual_seed(0)
    model(**batch).loss.backward()
    grads = [q.grad.detach().clone() if q.grad is not None else torch.zeros_like(q) for q in params]
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if engine is not None:
        engine.close()
    after = [q.detach().clone() for q in params]
    with torch.no_grad():
        for q, b in zip(params, before):
            q.copy_(b)
    return [a - b for a, b in zip(after, before)], grads


@pytest.fixture
def bench_and_batch(make_recipe, partition_dir):
    r = make_recipe("fedavg", optimizer="sgd", lr=0.1)
    bench = build(r, 2)
    examples = read_shard(partition_dir / "client-0.parquet", "text", "sentiment", 2)
    batch = encode(bench.tokenizer, examples, np.arange(16), 16)
    return bench, batch


def test_dp_with_zero_noise_and_loose_clipping_equals_plain_training(bench_and_batch):
    """Guards against the PEFT/Opacus corruption reported upstream (opacus #820)."""
    bench, batch = bench_and_batch
    p = plan("fedavg", "shared")
    plain, _ = one_step_delta(bench, p, batch)
    dp, _ = one_step_delta(bench, p, batch, dp_engine=(0.0, 1e6))
    assert any(float(d.abs().max()) > 0 for d in plain)
    for a, b in zip(plain, dp):
        rel = float((a - b).norm() / (a.norm() + 1e-12))
        assert rel < 1e-5, rel


def test_small_clipping_bounds_the_gradient(bench_and_batch):
    """With noise 0, the DP gradient is a mean of per-example gradients clipped to C: its norm is at most C."""
    bench, batch = bench_and_batch
    p = plan("fedavg", "shared")
    lr = bench.recipe.training.lr
    _, plain_grads = one_step_delta(bench, p, batch)
    plain_norm = float(torch.sqrt(sum((g**2).sum() for g in plain_grads)))
    clip = plain_norm / 20
    delta, _ = one_step_delta(bench, p, batch, dp_engine=(0.0, clip))
    dp_grad_norm = float(torch.sqrt(sum((d**2).sum() for d in delta))) / lr
    assert plain_norm > clip
    assert dp_grad_norm <= clip * (1 + 1e-4)
    assert dp_grad_norm > 0


def test_model_in_eval_mode_trains_under_dp(bench_and_batch, partition_dir):
    bench, _ = bench_and_batch
    bench.model.eval()  # as from_pretrained leaves it
    examples = read_shard(partition_dir / "client-0.parquet", "text", "sentiment", 2)
    before = bench.adapter_tensors()
    result = local_train(bench, plan("ffa", "shared"), examples, seed=0, dp=DPSettings(1.0, 1.0, 0.1, secret_seed=3))
    after = bench.adapter_tensors()
    assert result.steps == bench.recipe.training.local_steps
    moved = [n for n in before if not torch.equal(before[n], after[n])]
    assert moved and all(role_of(n) != "lora_A" for n in moved)
    assert any(role_of(n) == "lora_B" for n in moved)


def test_dp_federation_moves_b_keeps_a_and_accumulates_epsilon(tmp_path, tiny_model_dir, reviews_csv, run_federation):
    r = recipes.from_dict(private_recipe(tiny_model_dir, reviews_csv, target_epsilon=8.0))
    layout = run_federation(r)
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


def test_dp_with_local_epochs_runs_the_steps_it_calibrated_for(tmp_path, tiny_model_dir, reviews_csv, run_federation):
    # 1.1 x 50 / 5 is 11.000000000000002 in floating point: calibration and training must both count 11 steps.
    assert privacy.client_plan(50, 5, None, 1.1).steps_per_round == 11
    raw = private_recipe(tiny_model_dir, reviews_csv, target_epsilon=4.0)
    raw["training"]["local_steps"] = None
    raw["training"]["local_epochs"] = 0.7
    raw["federation"]["rounds"] = 3
    layout = run_federation(recipes.from_dict(raw))
    part = json.loads((layout.data / "partition.json").read_text())
    for c in part["clients"]:
        planned = privacy.client_plan(c["examples"], 8, None, 0.7).steps_per_round
        ledger = storage.latest_state(layout.state(c["id"]), 10**6).manifest.privacy
        assert [entry[2] for entry in ledger["history"]] == [planned] * 3
        assert ledger["epsilon"] <= 4.0


def test_calibrated_noise_is_never_rounded_below_the_accountants():
    r = recipes.from_dict({"name": "p", "model": {"base": "-", "num_labels": 2},
                           "privacy": {"target_epsilon": 2.0, "delta": 1e-5, "max_grad_norm": 1.0},
                           "federation": {"clients": 2, "rounds": 3}, "training": {"local_steps": 7, "batch_size": 16}})
    partition = {"clients": [{"examples": 1000}, {"examples": 3000}]}
    sigma = federation.calibrated(r, partition).privacy.noise_multiplier
    plans = [privacy.client_plan(n, 16, 7, None) for n in (1000, 3000)]
    target = r.privacy.target_epsilon * (1 - federation.CALIBRATION_MARGIN)
    raw_sigma = max(privacy.calibrate(target, 1e-5, p.sample_rate, p.steps_per_round * 3) for p in plans)
    assert raw_sigma <= sigma < raw_sigma + 1e-6


def test_the_ledger_records_a_round_even_if_its_update_is_never_written(tmp_path, tiny_model_dir, reviews_csv, partition_dir, monkeypatch):
    raw = private_recipe(tiny_model_dir, reviews_csv, noise_multiplier=1.0)
    r = recipes.from_dict(raw)
    federation.init(r, tmp_path / "g0", partition=json.loads((partition_dir / "partition.json").read_text()))

    def broken_write(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(storage, "write_update", broken_write)
    with pytest.raises(OSError):
        federation.train_client(tmp_path / "g0", partition_dir / "client-0.parquet", tmp_path / "state",
                                tmp_path / "u", "client-0")
    assert not (tmp_path / "u").exists()
    ledger = storage.latest_state(tmp_path / "state", 10**6).manifest.privacy
    assert len(ledger["history"]) == 1 and ledger["epsilon"] > 0


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


def test_round_over_budget_is_refused_and_writes_nothing(tmp_path, tiny_model_dir, reviews_csv, partition_dir):
    raw = private_recipe(tiny_model_dir, reviews_csv, noise_multiplier=0.8, target_epsilon=3.0)
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text(yaml.safe_dump(raw))
    assert runner.invoke(app, ["init", str(recipe_path), "--data", str(partition_dir), "--out", str(tmp_path / "g0")]).exit_code == 0
    state = tmp_path / "state"
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


def test_delta_too_large_for_the_client(tmp_path, tiny_model_dir, reviews_csv, partition_dir):
    raw = private_recipe(tiny_model_dir, reviews_csv, target_epsilon=3.0)
    raw["privacy"]["delta"] = 0.05
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text(yaml.safe_dump(raw))
    result = runner.invoke(app, ["init", str(recipe_path), "--data", str(partition_dir), "--out", str(tmp_path / "g0")])
    assert result.exit_code == 1 and "privacy.delta" in result.output and "1/n" in result.output
    assert not (tmp_path / "g0").exists()


def test_ledger_from_another_recipe_is_refused(tmp_path, tiny_model_dir, reviews_csv, partition_dir):
    for k, eps in enumerate((3.0, 4.0)):
        raw = private_recipe(tiny_model_dir, reviews_csv, noise_multiplier=1.0, target_epsilon=eps)
        (tmp_path / f"r{k}.yaml").write_text(yaml.safe_dump(raw))
        result = runner.invoke(app, ["init", str(tmp_path / f"r{k}.yaml"), "--data", str(partition_dir), "--out", str(tmp_path / f"g{k}")])
        assert result.exit_code == 0, result.output
    args = ["--data", str(partition_dir / "client-0.parquet"), "--state", str(tmp_path / "state")]
    assert runner.invoke(app, ["train-client", str(tmp_path / "g0"), *args, "--out", str(tmp_path / "u0")]).exit_code == 0
    result = runner.invoke(app, ["train-client", str(tmp_path / "g1"), *args, "--out", str(tmp_path / "u1")])
    assert result.exit_code == 1 and "different recipe" in result.output
    assert not (tmp_path / "u1").exists()


@pytest.mark.parametrize(
    "section, key",
    [({"target_epsilon": -1.0}, "privacy.target_epsilon"), ({"target_epsilon": 1.0, "delta": 1.5}, "privacy.delta"),
     ({}, "privacy.target_epsilon"), ({"noise_multiplier": 1.0, "accountant": "gdp"}, "privacy.accountant")],
)
def test_bad_privacy_settings_name_the_key(section, key):
    raw = {"model": {"base": "m"}, "privacy": section}
    with pytest.raises(Exception, match=key.replace(".", r"\.")):
        recipes.from_dict(raw)


def test_privacy_plan_command():
    result = runner.invoke(app, ["privacy", "plan", "--epsilon", "3", "--examples", "2500", "--batch-size", "32",
                                 "--steps", "40", "--rounds", "3", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["noise_multiplier"] > 0
    assert data["epsilon_check"] <= 3.0 and data["epsilon_check"] == pytest.approx(3.0, rel=0.02)


# DP-FedAvg -----------------------------------------------------------------------------------------------


def test_dp_fedavg_with_zero_noise_is_the_mean_of_clipped_updates():
    ref = {"w": torch.zeros(3)}
    updates = [{"w": torch.tensor([3.0, 4.0, 0.0])}, {"w": torch.tensor([0.1, 0.0, 0.0])}]
    result = privacy.dp_fedavg(((u, 0.9 if i == 0 else 0.1) for i, u in enumerate(updates)), ref, 1.0, 0.0, 2, seed=0)
    clipped = [aggregation.clip_to_norm(u, ref, 1.0) for u in updates]
    torch.testing.assert_close(result["w"], (clipped[0]["w"] + clipped[1]["w"]) / 2)
    torch.testing.assert_close(clipped[0]["w"], torch.tensor([0.6, 0.8, 0.0]))
    torch.testing.assert_close(clipped[1]["w"], updates[1]["w"])  # already within the bound
    for c in clipped:
        assert aggregation.update_norm(c, ref) <= 1.0 + 1e-6


def test_dp_fedavg_noise_has_the_promised_scale():
    ref = {"w": torch.zeros(20000)}
    updates = [({"w": torch.zeros(20000)}, 0.25)] * 4
    result = privacy.dp_fedavg(iter(updates), ref, clip=2.0, noise_multiplier=1.5, num_clients=4, seed=1)
    assert float(result["w"].std()) == pytest.approx(1.5 * 2.0 / 4, rel=0.03)


def test_server_dp_aggregation_through_the_cli(make_recipe, run_federation, tmp_path):
    layout = run_federation(make_recipe("fedavg"))
    updates = [str(layout.update(1, c)) for c in ("client-0", "client-1", "client-2")]
    result = runner.invoke(app, ["aggregate", str(layout.global_checkpoint(0)), *updates, "--out", str(tmp_path / "g"),
                                 "--dp-clip", "0.5", "--dp-noise", "1.0", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    expected = privacy.epsilon([(1.0, 1.0, 1)], 1e-5, "rdp")
    assert data["server_epsilon"] == pytest.approx(expected)
    m = storage.read_global(tmp_path / "g").manifest
    assert m.server_privacy_ledger == [[1.0, 1.0, 1]]
    # Noise 0 equals the plain mean of clipped deltas, computed here by hand.
    result = federation.aggregate_round(
        layout.global_checkpoint(0), [Path(u) for u in updates], tmp_path / "g0noise",
        server_privacy=recipes.ServerPrivacySection(clip_norm=0.5, noise_multiplier=0.0),
    )
    g0 = load_file(str(layout.global_checkpoint(0) / storage.ADAPTER_WEIGHTS))
    sent = [load_file(str(Path(u) / storage.UPDATE_TENSORS)) for u in updates]
    ref = {n: g0[n] for n in sent[0]}
    by_hand = aggregation.weighted_mean((aggregation.clip_to_norm(s, ref, 0.5), 1 / 3) for s in sent)
    got = load_file(str(tmp_path / "g0noise" / storage.ADAPTER_WEIGHTS))
    for n, t in by_hand.items():
        torch.testing.assert_close(got[n], t)


def test_server_epsilon_reported_later_is_the_one_aggregate_printed(make_recipe, run_federation, tmp_path):
    layout = run_federation(make_recipe("fedavg"))
    updates = [str(layout.update(1, c)) for c in ("client-0", "client-1", "client-2")]
    result = runner.invoke(app, ["aggregate", str(layout.global_checkpoint(0)), *updates, "--out", str(tmp_path / "g"),
                                 "--dp-clip", "0.5", "--dp-noise", "0.8", "--dp-delta", "1e-3", "--json"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)["server_epsilon"]
    report = runner.invoke(app, ["privacy", "report", str(tmp_path / "g"), "--json"])
    assert report.exit_code == 0, report.output
    entry = json.loads(report.stdout)[0]
    assert entry["delta"] == 1e-3 and entry["epsilon"] == pytest.approx(printed)
    assert printed == pytest.approx(privacy.epsilon([(0.8, 1.0, 1)], 1e-3, "rdp"))


def test_command_line_dp_fedavg_is_bound_by_the_recipes_budget(tiny_model_dir, reviews_csv, run_federation, tmp_path):
    raw = recipe_dict(tiny_model_dir, reviews_csv)
    raw["server_privacy"] = {"clip_norm": 1.0, "noise_multiplier": 5.0, "target_epsilon": 2.0}
    layout = run_federation(recipes.from_dict(raw))
    updates = [str(layout.update(1, c)) for c in ("client-0", "client-1", "client-2")]
    # Far less noise than the recipe's: one round of it would spend more than the recipe allows.
    result = runner.invoke(app, ["aggregate", str(layout.global_checkpoint(0)), *updates, "--out", str(tmp_path / "g"),
                                 "--dp-clip", "1.0", "--dp-noise", "0.3"])
    assert result.exit_code == 1 and "server_privacy.target_epsilon" in result.output, result.output
    assert not (tmp_path / "g").exists()


def test_dp_fedavg_divides_by_the_federation_size_not_the_arrivals(make_recipe, run_federation, tmp_path):
    layout = run_federation(make_recipe("fedavg"))  # a federation of 3 clients
    arrived = [layout.update(1, c) for c in ("client-0", "client-1")]
    federation.aggregate_round(layout.global_checkpoint(0), arrived, tmp_path / "g",
                               server_privacy=recipes.ServerPrivacySection(clip_norm=0.5, noise_multiplier=0.0))
    g0 = load_file(str(layout.global_checkpoint(0) / storage.ADAPTER_WEIGHTS))
    sent = [load_file(str(u / storage.UPDATE_TENSORS)) for u in arrived]
    ref = {n: g0[n] for n in sent[0]}
    clipped = [aggregation.clip_to_norm(s, ref, 0.5) for s in sent]
    got = load_file(str(tmp_path / "g" / storage.ADAPTER_WEIGHTS))
    for n in ref:
        # ref + sum_k clip(delta_k) / m with m = 3: a missing client counts as a zero update.
        torch.testing.assert_close(got[n], ref[n] + sum(c[n] - ref[n] for c in clipped) / 3)


def test_retraining_a_round_keeps_its_spending(tmp_path, tiny_model_dir, reviews_csv, partition_dir):
    raw = private_recipe(tiny_model_dir, reviews_csv, noise_multiplier=1.0)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    assert runner.invoke(app, ["init", str(tmp_path / "r.yaml"), "--data", str(partition_dir), "--out", str(tmp_path / "g0")]).exit_code == 0
    args = ["train-client", str(tmp_path / "g0"), "--data", str(partition_dir / "client-0.parquet"),
            "--state", str(tmp_path / "state"), "--out", str(tmp_path / "u")]
    assert runner.invoke(app, args).exit_code == 0
    again = runner.invoke(app, [*args[:-1], str(tmp_path / "u-again")])
    assert again.exit_code == 1 and "already trained round 1" in again.output
    assert not (tmp_path / "u-again").exists()
    assert runner.invoke(app, [*args, "--overwrite"]).exit_code == 0
    ledger = storage.latest_state(tmp_path / "state", 10**6).manifest.privacy
    assert len(ledger["history"]) == 2, "the first attempt's spending is still counted"


def test_an_empty_poisson_batch_still_releases_noise(make_recipe, partition_dir):
    # At this sample rate nearly every step samples no example; each must still be a noisy step, as the
    # accountant counts it, never a silent no-op.
    bench = build(make_recipe("ffa", "frozen", optimizer="sgd", lr=0.1), 2)
    examples = read_shard(partition_dir / "client-0.parquet", "text", "sentiment", 2)
    before = bench.adapter_tensors()
    result = local_train(bench, plan("ffa", "frozen"), examples, seed=0, dp=DPSettings(1.0, 1.0, 1e-6, secret_seed=2))
    after = bench.adapter_tensors()
    assert result.steps == bench.recipe.training.local_steps
    assert all(not torch.equal(before[n], after[n]) for n in before if role_of(n) == "lora_B")
    assert all(torch.equal(before[n], after[n]) for n in before if role_of(n) != "lora_B")


@pytest.mark.parametrize("method, head", [("fedavg", "shared"), ("fedsa", "local"), ("ffa", "frozen"), ("fedsa", "shared")])
def test_dp_sgd_trains_exactly_the_planned_roles(method, head, make_recipe, partition_dir):
    bench = build(make_recipe(method, head), 2)
    p = plan(method, head)
    examples = read_shard(partition_dir / "client-0.parquet", "text", "sentiment", 2)
    before = bench.adapter_tensors()
    local_train(bench, p, examples, seed=0, dp=DPSettings(0.5, 1.0, 0.1, secret_seed=1))
    after = bench.adapter_tensors()
    for role in ("lora_A", "lora_B", "head"):
        moved = [not torch.equal(before[n], after[n]) for n in before if role_of(n) == role]
        if role in p.trained:
            assert any(moved), f"{role} should train under {method}/{head}"
        else:
            assert not any(moved), f"{role} must stay frozen under {method}/{head}"


def test_simulate_reports_the_epsilon_spent(tmp_path, tiny_model_dir, reviews_csv):
    raw = private_recipe(tiny_model_dir, reviews_csv, noise_multiplier=1.0)
    raw["federation"]["rounds"] = 1
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    result = runner.invoke(app, ["simulate", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "run"), "--json"])
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)["rounds"][0]
    updates = [storage.read_update(tmp_path / "run" / "updates" / "round-001" / f"client-{k}").manifest for k in range(3)]
    assert row["epsilon"] == max(u.privacy["epsilon"] for u in updates) > 0


def test_aggregating_a_round_twice_counts_both_releases(make_recipe, run_federation, tmp_path):
    layout = run_federation(make_recipe("fedavg"))
    updates = [str(layout.update(1, c)) for c in ("client-0", "client-1", "client-2")]
    base = ["aggregate", str(layout.global_checkpoint(0)), *updates, "--dp-clip", "0.5", "--dp-noise", "1.0", "--json"]
    first = runner.invoke(app, [*base, "--out", str(tmp_path / "g")])
    assert first.exit_code == 0, first.output
    # The same round again, to another folder: a second noisy release of the same clients' data.
    second = runner.invoke(app, [*base, "--out", str(tmp_path / "g-again")])
    assert second.exit_code == 0, second.output
    one, two = json.loads(first.stdout), json.loads(second.stdout)
    assert one["server_epsilon"] == pytest.approx(privacy.epsilon([(1.0, 1.0, 1)], 1e-5, "rdp"))
    assert two["server_epsilon"] == pytest.approx(privacy.epsilon([(1.0, 1.0, 1)] * 2, 1e-5, "rdp"))
    assert two["server_epsilon"] > one["server_epsilon"]
    ledger = privacy.read_server_ledger(Path(two["server_ledger"]))
    assert Path(two["server_ledger"]).parent == layout.global_checkpoint(0).resolve().parent
    assert [r["out"] for r in ledger.releases] == [str((tmp_path / "g").resolve()), str((tmp_path / "g-again").resolve())]
    assert storage.read_global(tmp_path / "g-again").manifest.server_privacy_ledger == [[1.0, 1.0, 1]] * 2
    # The next round, built on the first output, still carries both releases.
    report = runner.invoke(app, ["privacy", "report", str(tmp_path / "g-again"), "--json"])
    assert json.loads(report.stdout)[0]["epsilon"] == pytest.approx(two["server_epsilon"])


def test_a_second_release_over_the_budget_is_refused(tiny_model_dir, reviews_csv, run_federation, tmp_path):
    raw = recipe_dict(tiny_model_dir, reviews_csv)
    one_round = privacy.epsilon([(2.0, 1.0, 1)], 1e-5, "rdp")
    raw["server_privacy"] = {"clip_norm": 1.0, "noise_multiplier": 2.0, "target_epsilon": one_round * 1.2}
    raw["federation"]["rounds"] = 1
    layout = run_federation(recipes.from_dict(raw))  # simulate spends the budget's first release: round 1
    ledger_files = list(layout.global_checkpoint(0).parent.glob("dp-fedavg-ledger-*.json"))
    assert len(ledger_files) == 1 and len(privacy.read_server_ledger(ledger_files[0]).releases) == 1
    updates = [str(layout.update(1, c)) for c in ("client-0", "client-1", "client-2")]
    again = runner.invoke(app, ["aggregate", str(layout.global_checkpoint(0)), *updates, "--out", str(tmp_path / "g")])
    assert again.exit_code == 1 and "server_privacy.target_epsilon" in again.output, again.output
    assert "2 releases" in again.output
    assert not (tmp_path / "g").exists()
    assert len(privacy.read_server_ledger(ledger_files[0]).releases) == 1, "a refused release is not recorded"


def test_a_ledger_that_misses_the_checkpoints_history_is_refused(make_recipe, run_federation, tmp_path):
    layout = run_federation(make_recipe("fedavg"))
    updates = [str(layout.update(1, c)) for c in ("client-0", "client-1", "client-2")]
    dp = ["--dp-clip", "0.5", "--dp-noise", "1.0"]
    assert runner.invoke(app, ["aggregate", str(layout.global_checkpoint(0)), *updates, "--out", str(tmp_path / "g1"), *dp]).exit_code == 0
    # A ledger of another federation, empty, given for a checkpoint that already has one release in its history.
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"format_version": 1, "releases": []}))
    result = runner.invoke(app, ["aggregate", str(tmp_path / "g1"), *updates, "--out", str(tmp_path / "g2"), *dp,
                                 "--server-ledger", str(other)])
    assert result.exit_code == 1 and "not this federation's" in result.output, result.output
    other.write_text(json.dumps({"format_version": 1, "releases": [{"noise_multiplier": "x"}]}))
    result = runner.invoke(app, ["aggregate", str(tmp_path / "g1"), *updates, "--out", str(tmp_path / "g2"), *dp,
                                 "--server-ledger", str(other)])
    assert result.exit_code == 1 and "malformed" in result.output, result.output
    assert not (tmp_path / "g2").exists()


def test_privacy_report_of_a_run_counts_releases_its_checkpoints_do_not_show(tiny_model_dir, reviews_csv, run_federation, tmp_path):
    raw = recipe_dict(tiny_model_dir, reviews_csv)
    raw["server_privacy"] = {"clip_norm": 1.0, "noise_multiplier": 2.0}
    raw["federation"]["rounds"] = 1
    layout = run_federation(recipes.from_dict(raw))
    updates = [str(layout.update(1, c)) for c in ("client-0", "client-1", "client-2")]
    # Round 1 aggregated a second time, outside the run: global/round-001 still shows one release.
    again = runner.invoke(app, ["aggregate", str(layout.global_checkpoint(0)), *updates, "--out", str(tmp_path / "elsewhere")])
    assert again.exit_code == 0, again.output
    assert storage.read_global(layout.global_checkpoint(1)).manifest.server_privacy_ledger == [[2.0, 1.0, 1]]
    report = runner.invoke(app, ["privacy", "report", str(layout.root), "--json"])
    assert report.exit_code == 0, report.output
    server = [e for e in json.loads(report.stdout) if e["who"].startswith("server")]
    assert len(server) == 1 and len(server[0]["history"]) == 2
    assert server[0]["epsilon"] == pytest.approx(privacy.epsilon([(2.0, 1.0, 1)] * 2, 1e-5, "rdp"))
