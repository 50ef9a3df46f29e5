"""fedlora_cli.privacy.planning and `fedlora privacy plan`: candidate DP-SGD plans spend exactly the budget, their
noise-to-signal ratio is sigma sqrt(d) / B for the coordinates the method trains, the recommendation follows its
rule, and the recommended plan, run for real in separate processes, spends what an independent accountant says."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import yaml
from conftest import private_recipe
from opacus.accountants import create_accountant

from fedlora_cli import recipe as recipes
from fedlora_cli.adapters.methods import plan
from fedlora_cli.data.examples import read_shard
from fedlora_cli.model.workbench import trained_coordinates
from fedlora_cli.privacy import planning


def test_every_candidate_spends_the_budget_and_reports_its_noise_to_signal_ratio():
    found = planning.candidates(5000, 3.0, 1e-5, rounds=3, coordinates=40_000, batches=(64, 256), epochs=(1, 2))
    assert [(c.batch, c.steps_per_round) for c in found] == [(64, 27), (64, 53), (256, 7), (256, 14)]
    for c in found:
        assert c.sample_rate == c.batch / 5000
        assert c.noise_to_signal == pytest.approx(c.noise_multiplier * math.sqrt(40_000) / c.batch)
        assert planning.spent(c, 3, 1e-5) == pytest.approx(3.0, rel=0.01)
        assert planning.spent(c, 3, 1e-5) <= 3.0 + 1e-9
    # Larger batches at the same epochs need more noise but less of it per example: the ratio falls.
    assert found[2].noise_multiplier > found[0].noise_multiplier and found[2].noise_to_signal < found[0].noise_to_signal


def test_the_recommendation_is_the_quietest_plan_that_trains_enough_recalibrated_by_the_accountant():
    found = planning.candidates(5000, 3.0, 1e-5, rounds=3, coordinates=40_000, batches=(64, 256, 1024), epochs=(1, 2))
    best = planning.recommend(found, 5000, 3.0, 1e-5, 3, 40_000, "prv")
    usable = [c for c in found if c.steps_per_round >= planning.MIN_STEPS_PER_ROUND and c.epochs >= 1]
    quietest = min(usable, key=lambda c: c.noise_to_signal)
    assert (best.batch, best.steps_per_round) == (quietest.batch, quietest.steps_per_round)
    assert best.accountant == "prv" and best.noise_multiplier <= quietest.noise_multiplier  # PRV is tighter
    assert planning.spent(best, 3, 1e-5) == pytest.approx(3.0, rel=0.01)
    # 1024 of 5000 over 3 rounds is 2 steps a round for one epoch: quieter, but too few steps to be recommended.
    too_few = next(c for c in found if (c.batch, c.steps_per_round) == (1024, 2))
    assert too_few.noise_to_signal < quietest.noise_to_signal and best.steps_per_round >= 3
    assert planning.recommend(found[:0], 5000, 3.0, 1e-5, 3, 40_000, "prv") is None


def test_ffa_trains_about_half_the_coordinates_of_fedavg(tiny_model_dir, reviews_csv):
    """Tiny BERT: 2 layers x (query, value) adapted at rank 4, width 32; the head is 32 x 2 + 2."""
    raw = private_recipe(tiny_model_dir, reviews_csv, noise_multiplier=1.0)
    r = recipes.from_dict(raw)
    factors = 2 * 2 * (4 * 32)
    head = 32 * 2 + 2
    assert trained_coordinates(r, plan("fedavg", "shared"), 2) == 2 * factors + head
    assert trained_coordinates(r, plan("ffa", "shared"), 2) == factors + head
    assert trained_coordinates(r, plan("ffa", "frozen"), 2) == factors


def test_the_recommended_plan_run_in_separate_processes_spends_what_an_independent_accountant_says(
    tmp_path, tiny_model_dir, reviews_csv, partition_dir
):
    def cli(*args):
        proc = subprocess.run([sys.executable, "-m", "fedlora_cli", *map(str, args)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    # The largest shard of the fixture's partition (client-0 holds 13 reviews: too few for any plan).
    shard = partition_dir / "client-1.parquet"
    n = len(read_shard(shard, "text", "sentiment", 2))
    raw = private_recipe(tiny_model_dir, reviews_csv, target_epsilon=3.0, accountant="prv")
    raw["federation"]["rounds"] = 2
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text(yaml.safe_dump(raw))
    planned = json.loads(cli("privacy", "plan", "--recipe", recipe_path, "--examples", n, "--json"))
    best = planned["recommended"]
    assert best is not None and planned["coordinates"] == 2 * 2 * 4 * 32 + 66

    raw["training"].update(batch_size=best["batch"], local_steps=best["steps_per_round"])
    raw["privacy"]["noise_multiplier"] = best["noise_multiplier"]
    recipe_path.write_text(yaml.safe_dump(raw))
    cli("init", recipe_path, "--data", partition_dir, "--out", tmp_path / "g0")
    for round_ in (1, 2):
        # Micro-batches of a quarter of the logical batch: the ledger still counts logical steps.
        info = json.loads(cli("train-client", tmp_path / f"g{round_ - 1}", "--data", shard, "--state",
                              tmp_path / "client-1", "--out", tmp_path / f"u{round_}", "--accumulation-steps", 4,
                              "--json"))
        cli("aggregate", tmp_path / f"g{round_ - 1}", tmp_path / f"u{round_}", "--out", tmp_path / f"g{round_}")
    accountant = create_accountant(mechanism="prv")
    for _ in range(2 * best["steps_per_round"]):
        accountant.step(noise_multiplier=best["noise_multiplier"], sample_rate=best["batch"] / n)
    independent = accountant.get_epsilon(delta=1e-3)
    assert info["privacy"]["epsilon"] == pytest.approx(independent, rel=0.01)
    assert info["privacy"]["epsilon"] == pytest.approx(planned["recommended_epsilon"], rel=0.01)
    assert independent <= 3.0 * 1.01
