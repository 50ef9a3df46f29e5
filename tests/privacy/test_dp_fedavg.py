"""fedlora_cli.privacy.dp_fedavg: DP-FedAvg at the coordinator, the function and the DPFedAvg wrapper strategy (on
hand-made contributions), and through aggregate_round and the CLI: clipping, the fixed denominator, the noise's
scale, the budget, and every release counted."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FakeContribution as TensorContribution, exact_gaussian_epsilon, recipe_dict, run
from opacus.accountants import RDPAccountant
from safetensors.torch import load_file
from typer.testing import CliRunner

from fedlora_cli import aggregation, federation, privacy, recipe as recipes, storage
from fedlora_cli.adapters.kinds import adapter_kind
from fedlora_cli.aggregation import Contributions, Mean, RoundSpec, TrimmedMean
from fedlora_cli.cli import app
from fedlora_cli.errors import FedloraError
from fedlora_cli.privacy.dp_fedavg import DPFedAvg
from fedlora_cli.storage.mapped import narrow, widen

runner = CliRunner()


def arrays(tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Torch tensors as the coordinator holds them: numpy arrays, bfloat16 widened to float32 exactly."""
    return {n: widen(a) for n, a in storage.as_arrays(tensors).items()}


def tensors(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {n: torch.from_numpy(np.asarray(a)) for n, a in arrays.items()}


@dataclass
class FakeContribution(TensorContribution):
    """conftest's hand-made contribution over numpy arrays: read back as a copy."""

    def get(self, name: str) -> np.ndarray:
        self.reads.append(name)
        return self.stored[name].copy()


def test_dp_fedavg_with_zero_noise_is_the_mean_of_clipped_updates():
    ref = arrays({"w": torch.zeros(3)})
    updates = [arrays({"w": torch.tensor([3.0, 4.0, 0.0])}), arrays({"w": torch.tensor([0.1, 0.0, 0.0])})]
    result = privacy.dp_fedavg(((u, 0.9 if i == 0 else 0.1) for i, u in enumerate(updates)), ref, 1.0, 0.0, 2, seed=0)
    clipped = [tensors(aggregation.clip_to_norm(u, ref, 1.0)) for u in updates]
    torch.testing.assert_close(tensors(result)["w"], (clipped[0]["w"] + clipped[1]["w"]) / 2)
    torch.testing.assert_close(clipped[0]["w"], torch.tensor([0.6, 0.8, 0.0]))
    torch.testing.assert_close(clipped[1]["w"], tensors(updates[1])["w"])  # already within the bound
    # The large update lands exactly on the bound; the small one keeps its own norm.
    assert [aggregation.update_norm(arrays(c), ref) for c in clipped] == pytest.approx([1.0, 0.1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dp_fedavg_clips_the_float32_delta_so_no_update_exceeds_the_bound(dtype):
    """Clipped as reference + scaled delta and rounded to the tensor's dtype, the clipped norm can exceed C
    (1.0000000149 C in float32, about 1.014 C in bfloat16): the delta itself is clipped, in float32."""
    generator = torch.Generator().manual_seed(0)
    bound = 1.0
    for trial in range(20):
        ref = {"a": (torch.randn(257, generator=generator) * 3).to(dtype), "b": torch.randn(3, 5, generator=generator).to(dtype)}
        update = {n: (t.float() + torch.randn(t.shape, generator=generator) * (trial + 1)).to(dtype) for n, t in ref.items()}
        delta = tensors(aggregation.clipped_delta(arrays(update), arrays(ref), bound))
        assert {t.dtype for t in delta.values()} == {torch.float32}
        norm = sum(float(torch.linalg.vector_norm(d, dtype=torch.float64)) ** 2 for d in delta.values()) ** 0.5
        assert norm <= bound, f"trial {trial}: clipped norm {norm!r} above the bound"
        assert norm == pytest.approx(bound, rel=1e-5), "an update beyond the bound lands on it"
    small = {"a": ref["a"].float() + 1e-3, "b": ref["b"].float()}
    torch.testing.assert_close(tensors(aggregation.clipped_delta(arrays(small), arrays(ref), bound))["a"],
                               small["a"] - ref["a"].float())


def test_the_old_clipping_in_the_tensors_dtype_could_exceed_the_bound_in_bfloat16():
    """Why the delta is clipped in float32: rounding reference + scaled delta to bfloat16 overshoots."""
    generator = torch.Generator().manual_seed(1)
    ref = {"w": torch.randn(1000, generator=generator).to(torch.bfloat16)}
    update = {"w": (ref["w"].float() + torch.randn(1000, generator=generator)).to(torch.bfloat16)}
    clipped = aggregation.clip_to_norm(arrays(update), arrays(ref), 0.5)
    rounded = {n: widen(narrow(t, "BF16")) for n, t in clipped.items()}  # back in the update's own dtype
    assert aggregation.update_norm(rounded, arrays(ref)) > 0.5


def test_dp_fedavg_noise_has_the_promised_scale():
    ref = {"w": np.zeros(20000, np.float32)}
    updates = [({"w": np.zeros(20000, np.float32)}, 0.25)] * 4
    result = privacy.dp_fedavg(iter(updates), ref, clip=2.0, noise_multiplier=1.5, num_clients=4, seed=1)
    assert float(result["w"].std()) == pytest.approx(1.5 * 2.0 / 4, rel=0.03)
    assert float(result["w"].mean()) == pytest.approx(0.0, abs=0.03) and result["w"].dtype == np.float32


def test_server_dp_aggregation_through_the_cli(make_recipe, federation_copy, tmp_path):
    layout = federation_copy(make_recipe("fedavg"))
    updates = [str(layout.update(1, c)) for c in ("client-0", "client-1", "client-2")]
    result = runner.invoke(app, ["aggregate", str(layout.global_checkpoint(0)), *updates, "--out", str(tmp_path / "g"),
                                 "--dp-clip", "0.5", "--dp-noise", "1.0", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    expected = exact_gaussian_epsilon([(1.0, 1)], 1e-5)
    assert data["server_epsilon"] == pytest.approx(expected, rel=1e-4)
    m = storage.read_global(tmp_path / "g").manifest
    assert m.server_privacy_ledger == [[1.0, 1.0, 1]]
    # Noise 0 equals the plain mean of clipped deltas, computed here by hand.
    result = federation.aggregate_round(
        layout.global_checkpoint(0), [Path(u) for u in updates], tmp_path / "g0noise",
        server_privacy=recipes.ServerPrivacySection(clip_norm=0.5, noise_multiplier=0.0),
    )
    g0 = load_file(str(layout.global_checkpoint(0) / storage.ADAPTER_WEIGHTS))
    sent = [load_file(str(Path(u) / storage.UPDATE_TENSORS)) for u in updates]
    ref = arrays({n: g0[n] for n in sent[0]})
    by_hand = tensors(aggregation.weighted_mean((aggregation.clip_to_norm(arrays(s), ref, 0.5), 1 / 3) for s in sent))
    got = load_file(str(tmp_path / "g0noise" / storage.ADAPTER_WEIGHTS))
    for n, t in by_hand.items():
        torch.testing.assert_close(got[n], t)


def test_command_line_dp_fedavg_is_bound_by_the_recipes_budget(tiny_model_dir, reviews_csv, federation_copy, tmp_path):
    raw = recipe_dict(tiny_model_dir, reviews_csv)
    raw["server_privacy"] = {"clip_norm": 1.0, "noise_multiplier": 5.0, "target_epsilon": 2.0}
    layout = federation_copy(recipes.from_dict(raw))
    updates = [str(layout.update(1, c)) for c in ("client-0", "client-1", "client-2")]
    # Far less noise than the recipe's: one round of it would spend more than the recipe allows.
    result = runner.invoke(app, ["aggregate", str(layout.global_checkpoint(0)), *updates, "--out", str(tmp_path / "g"),
                                 "--dp-clip", "1.0", "--dp-noise", "0.3"])
    assert result.exit_code == 1 and "server_privacy.target_epsilon" in result.output, result.output
    assert not (tmp_path / "g").exists()


def test_dp_fedavg_divides_by_the_federation_size_not_the_arrivals(make_recipe, federation_copy, tmp_path):
    layout = federation_copy(make_recipe("fedavg"))  # a federation of 3 clients
    arrived = [layout.update(1, c) for c in ("client-0", "client-1")]
    federation.aggregate_round(layout.global_checkpoint(0), arrived, tmp_path / "g",
                               server_privacy=recipes.ServerPrivacySection(clip_norm=0.5, noise_multiplier=0.0))
    g0 = load_file(str(layout.global_checkpoint(0) / storage.ADAPTER_WEIGHTS))
    sent = [load_file(str(u / storage.UPDATE_TENSORS)) for u in arrived]
    ref = {n: g0[n] for n in sent[0]}
    clipped = [tensors(aggregation.clip_to_norm(arrays(s), arrays(ref), 0.5)) for s in sent]
    got = load_file(str(tmp_path / "g" / storage.ADAPTER_WEIGHTS))
    for n in ref:
        # ref + sum_k clip(delta_k) / m with m = 3: a missing client counts as a zero update.
        torch.testing.assert_close(got[n], ref[n] + sum(c[n] - ref[n] for c in clipped) / 3)


def test_aggregating_a_round_twice_counts_both_releases(make_recipe, federation_copy, tmp_path):
    layout = federation_copy(make_recipe("fedavg"))
    updates = [str(layout.update(1, c)) for c in ("client-0", "client-1", "client-2")]
    base = ["aggregate", str(layout.global_checkpoint(0)), *updates, "--dp-clip", "0.5", "--dp-noise", "1.0", "--json"]
    first = runner.invoke(app, [*base, "--out", str(tmp_path / "g")])
    assert first.exit_code == 0, first.output
    # The same round again, to another folder: a second noisy release of the same clients' data.
    second = runner.invoke(app, [*base, "--out", str(tmp_path / "g-again")])
    assert second.exit_code == 0, second.output
    one, two = json.loads(first.stdout), json.loads(second.stdout)
    assert one["server_epsilon"] == pytest.approx(exact_gaussian_epsilon([(1.0, 1)], 1e-5), rel=1e-4)
    assert two["server_epsilon"] == pytest.approx(exact_gaussian_epsilon([(1.0, 2)], 1e-5), rel=1e-4)
    assert two["server_epsilon"] > one["server_epsilon"]
    ledger = privacy.read_server_ledger(Path(two["server_ledger"]))
    assert Path(two["server_ledger"]).parent == layout.global_checkpoint(0).resolve().parent
    assert [r["out"] for r in ledger.releases] == [str((tmp_path / "g").resolve()), str((tmp_path / "g-again").resolve())]
    assert storage.read_global(tmp_path / "g-again").manifest.server_privacy_ledger == [[1.0, 1.0, 1]] * 2
    # The next round, built on the first output, still carries both releases.
    report = runner.invoke(app, ["privacy", "report", str(tmp_path / "g-again"), "--json"])
    assert json.loads(report.stdout)[0]["epsilon"] == pytest.approx(two["server_epsilon"])


def test_a_second_release_over_the_budget_is_refused(tiny_model_dir, reviews_csv, federation_copy, tmp_path):
    raw = recipe_dict(tiny_model_dir, reviews_csv)
    one_round = privacy.epsilon([(2.0, 1.0, 1)], 1e-5, "gaussian")
    raw["server_privacy"] = {"clip_norm": 1.0, "noise_multiplier": 2.0, "target_epsilon": one_round * 1.2}
    raw["federation"]["rounds"] = 1
    layout = federation_copy(recipes.from_dict(raw))  # simulate spends the budget's first release: round 1
    ledger_files = list(layout.global_checkpoint(0).parent.glob("dp-fedavg-ledger-*.json"))
    assert len(ledger_files) == 1 and len(privacy.read_server_ledger(ledger_files[0]).releases) == 1
    updates = [str(layout.update(1, c)) for c in ("client-0", "client-1", "client-2")]
    again = runner.invoke(app, ["aggregate", str(layout.global_checkpoint(0)), *updates, "--out", str(tmp_path / "g")])
    assert again.exit_code == 1 and "server_privacy.target_epsilon" in again.output, again.output
    assert "2 releases" in again.output
    assert not (tmp_path / "g").exists()
    assert len(privacy.read_server_ledger(ledger_files[0]).releases) == 1, "a refused release is not recorded"


# The DPFedAvg wrapper strategy, on hand-made contributions ------------------------------------------------------


class CountingMean(Mean):
    """The mean, counting how often DP-FedAvg delegates to it and recording the weights it was handed."""

    def __init__(self) -> None:
        self.calls = 0
        self.weights: list[float] = []

    def aggregate(self, contributions, spec):
        self.calls += 1
        result = super().aggregate(contributions, spec)
        self.weights = [c.weight for c in contributions.accepted]
        return result


def dp_strategy(tmp_path, inner, noise=0.0, clip=1.0, target=None, num_clients=3, releases=(), seed=0) -> DPFedAvg:
    settings = recipes.ServerPrivacySection(clip_norm=clip, noise_multiplier=noise, delta=1e-5, target_epsilon=target)
    ledger = privacy.ServerLedger(tmp_path / "ledger.json", [dict(r) for r in releases])
    return DPFedAvg(inner=inner, settings=settings, ledger=ledger, num_clients=num_clients, seed=seed,
                    release={"round": 4, "out": "g4"})


def test_dp_fedavg_takes_its_counts_and_rates_by_name(tmp_path):
    settings = recipes.ServerPrivacySection(clip_norm=1.0, noise_multiplier=1.0)
    ledger = privacy.ServerLedger(tmp_path / "ledger.json", [])
    with pytest.raises(TypeError):
        DPFedAvg(Mean(), settings, ledger, 3, 0, {}, 1.0, 3)  # which 3 is m, which the population?
    strategy = DPFedAvg(inner=Mean(), settings=settings, ledger=ledger, num_clients=2, seed=0, release={},
                        sample_rate=0.5, population=4)
    assert (strategy.num_clients, strategy.population, strategy.sample_rate) == (2, 4, 0.5)


REF = arrays({"w": torch.tensor([1.0, 1.0, 0.0]), "v": torch.tensor([2.0])})


def dp_spec() -> RoundSpec:
    return RoundSpec(sorted(REF), adapter_kind("lora"), 8.0, 4, lambda client_id: 4, REF)


def two_updates() -> list[FakeContribution]:
    # Client 0 moved by (3, 4, 0, 0): norm 5, clipped to 1. Client 1 by (0.1, 0, 0, 0): within the bound.
    # Their weights (0.9 / 0.1) must play no part: DP-FedAvg weighs every client 1 / m.
    big = {"w": REF["w"] + np.float32([3.0, 4.0, 0.0]), "v": REF["v"].copy()}
    small = {"w": REF["w"] + np.float32([0.1, 0.0, 0.0]), "v": REF["v"].copy()}
    return [FakeContribution("c0", 0.9, big), FakeContribution("c1", 0.1, small)]


def test_dp_fedavg_delegates_the_mean_of_clipped_deltas_to_the_wrapped_strategy(tmp_path):
    inner = CountingMean()
    strategy = dp_strategy(tmp_path, inner, noise=0.0, clip=1.0, num_clients=3)

    result = strategy.aggregate(Contributions([(c, True) for c in two_updates()]), dp_spec())

    assert inner.calls == 1
    assert inner.weights == pytest.approx([1 / 3, 1 / 3])  # 1/m for m = 3, not renormalised over 2 arrivals
    # ref + (clip(delta_0) + clip(delta_1)) / m, by hand: clip(3, 4, 0) = (0.6, 0.8, 0).
    got, ref = tensors(result.tensors), tensors(REF)
    torch.testing.assert_close(got["w"], ref["w"] + (torch.tensor([0.6, 0.8, 0.0]) + torch.tensor([0.1, 0.0, 0.0])) / 3)
    torch.testing.assert_close(got["v"], ref["v"])
    assert not (tmp_path / "ledger.json").exists(), "nothing is recorded before commit"


def test_dp_fedavg_uses_what_the_wrapped_strategy_returns(tmp_path):
    class Doubling(Mean):
        def aggregate(self, contributions, spec):
            result = super().aggregate(contributions, spec)
            result.tensors = {n: 2 * t for n, t in result.tensors.items()}
            return result

    plain = dp_strategy(tmp_path, Mean()).aggregate(Contributions([(c, True) for c in two_updates()]), dp_spec())
    doubled = dp_strategy(tmp_path, Doubling()).aggregate(Contributions([(c, True) for c in two_updates()]), dp_spec())
    # The wrapped strategy averages the deltas: doubling its output doubles the step away from the reference.
    np.testing.assert_allclose(doubled.tensors["w"] - REF["w"], 2 * (plain.tensors["w"] - REF["w"]), rtol=1.3e-6,
                               atol=1e-6)


def test_dp_fedavg_noise_follows_its_seed(tmp_path):
    run = lambda seed: dp_strategy(tmp_path, Mean(), noise=1.0, seed=seed).aggregate(  # noqa: E731
        Contributions([(c, True) for c in two_updates()]), dp_spec()).tensors["w"]
    assert np.array_equal(run(3), run(3))
    assert not np.array_equal(run(3), run(4))


def test_dp_fedavg_refuses_a_release_over_the_budget_before_any_work(tmp_path):
    one = privacy.epsilon([(1.0, 1.0, 1)], 1e-5, "gaussian")
    two = privacy.epsilon([(1.0, 1.0, 1)] * 2, 1e-5, "gaussian")
    target = (one + two) / 2  # room for one release, not for two
    first = dp_strategy(tmp_path, CountingMean(), noise=1.0, target=target)
    first.check_round(3)
    assert first.epsilon == pytest.approx(one)

    previous = [{"noise_multiplier": 1.0, "sample_rate": 1.0, "steps": 1}]
    inner = CountingMean()
    second = dp_strategy(tmp_path, inner, noise=1.0, target=target, releases=previous)
    assert second.history == [[1.0, 1.0, 1], [1.0, 1.0, 1]]
    with pytest.raises(FedloraError, match=r"server privacy budget.*2 releases.*server_privacy\.target_epsilon"):
        second.check_round(3)
    assert second.epsilon == pytest.approx(two)
    assert inner.calls == 0 and second.ledger.releases == previous and not (tmp_path / "ledger.json").exists()


def test_dp_fedavg_refuses_more_updates_than_the_federation_has_clients(tmp_path):
    inner = CountingMean()
    strategy = dp_strategy(tmp_path, inner, noise=1.0, num_clients=3)
    strategy.check_round(3)
    strategy.check_round(2)  # fewer arrivals are fine: the denominator stays 3
    with pytest.raises(FedloraError, match="4 client updates for a federation of federation.clients = 3"):
        strategy.check_round(4)
    assert inner.calls == 0 and not (tmp_path / "ledger.json").exists()


def test_dp_fedavg_commits_the_release_to_its_ledger(tmp_path):
    strategy = dp_strategy(tmp_path, Mean(), noise=0.7, clip=0.5)
    strategy.aggregate(Contributions([(c, True) for c in two_updates()]), dp_spec())
    strategy.commit()
    ledger = privacy.read_server_ledger(tmp_path / "ledger.json")
    assert len(ledger.releases) == 1
    release = ledger.releases[0]
    assert {k: release[k] for k in ("noise_multiplier", "sample_rate", "steps", "delta", "round", "out")} == {
        "noise_multiplier": 0.7, "sample_rate": 1.0, "steps": 1, "delta": 1e-5, "round": 4, "out": "g4"}
    assert ledger.history() == [[0.7, 1.0, 1]]
    assert strategy.describe() == {"strategy": "dp-fedavg"}


def test_dp_fedavg_checks_the_count_of_the_strategy_it_wraps(tmp_path):
    strategy = dp_strategy(tmp_path, TrimmedMean(0.25))
    with pytest.raises(FedloraError, match="trim fraction is 0.25, which trims no client out of 3"):
        strategy.check_count(3, "trim fraction")


# ... and in front of aggregate_round: refused before any client update's tensors are read ---------------------


def count_tensor_reads(monkeypatch) -> list[Path]:
    """From now on, list every client update whose tensors are read (all through the coordinator's one reader,
    :class:`fedlora_cli.storage.mapped.Layout`: screened one at a time or by the mean round)."""
    from fedlora_cli import storage
    from fedlora_cli.storage import mapped

    reads: list[Path] = []
    real_read, real_read_all = mapped.Layout.read, mapped.Layout.read_all

    def note(layout):
        if layout.path.name == storage.UPDATE_TENSORS:
            reads.append(Path(layout.path).parent)

    def read(self, name):
        note(self)
        return real_read(self, name)

    def read_all(self, what):
        note(self)
        return real_read_all(self, what)

    monkeypatch.setattr(mapped.Layout, "read", read)
    monkeypatch.setattr(mapped.Layout, "read_all", read_all)
    return reads


def test_aggregate_round_refuses_an_over_budget_release_before_reading_any_update(make_recipe, federation_copy,
                                                                                tmp_path, monkeypatch):
    layout = federation_copy(make_recipe("fedavg"))
    updates = [layout.update(1, c) for c in ("client-0", "client-1", "client-2")]
    reads = count_tensor_reads(monkeypatch)
    tight = recipes.ServerPrivacySection(clip_norm=0.5, noise_multiplier=0.3, target_epsilon=0.01)
    with pytest.raises(FedloraError, match="server_privacy.target_epsilon"):
        federation.aggregate_round(layout.global_checkpoint(0), updates, tmp_path / "g", server_privacy=tight)
    assert reads == [] and not (tmp_path / "g").exists()
    assert not list(layout.global_checkpoint(0).parent.glob("dp-fedavg-ledger-*.json")), "nothing released"
    # The same round within the budget reads every update once.
    federation.aggregate_round(layout.global_checkpoint(0), updates, tmp_path / "g",
                               server_privacy=recipes.ServerPrivacySection(clip_norm=0.5, noise_multiplier=0.3))
    assert reads == updates


def test_aggregate_round_refuses_more_updates_than_clients_before_reading_any(make_recipe, federation_copy,
                                                                            tmp_path, monkeypatch):
    layout = federation_copy(make_recipe("fedavg"))  # federation.clients = 3
    extra = storage.read_update(layout.update(1, "client-0"))
    extra.manifest.client_id = "client-3"
    fourth = storage.write_update(tmp_path / "client-3", extra.manifest,
                                  load_file(str(layout.update(1, "client-0") / storage.UPDATE_TENSORS))).path
    updates = [layout.update(1, c) for c in ("client-0", "client-1", "client-2")] + [fourth]
    reads = count_tensor_reads(monkeypatch)
    # A fourth update must come from a fourth client, which a federation of 3 does not have (issue 28): refused by
    # the participation rule before any tensor is read, as DP-FedAvg's own count check would.
    with pytest.raises(FedloraError, match="'client-3', which is not one of the federation's clients"):
        federation.aggregate_round(layout.global_checkpoint(0), updates, tmp_path / "g",
                                   server_privacy=recipes.ServerPrivacySection(clip_norm=0.5, noise_multiplier=1.0))
    assert reads == [] and not (tmp_path / "g").exists()
    assert not list(layout.global_checkpoint(0).parent.glob("dp-fedavg-ledger-*.json"))


def test_dp_fedavg_under_poisson_sampling_claims_no_amplification_since_the_sample_is_public(scaled, tmp_path):
    """The round's clients are drawn from the recipe's seed and recorded in the manifest: a public sample, so
    the release is accounted as if every client took part (q = 1), though the ledger records the rate asked."""
    recipe = scaled(clients=3, clients_per_round=2, sampling="poisson", rounds=1)
    recipe = recipes.from_dict({**recipe.to_dict(), "server_privacy": {"clip_norm": 0.5, "noise_multiplier": 1.2}})
    layout = run(recipe, tmp_path / "run")
    m = storage.read_global(layout.global_checkpoint(1)).manifest
    q = 2 / 3
    assert m.server_privacy_ledger == [[1.2, q, 1]]
    assert m.asked  # the sample anyone can read back
    report = runner.invoke(app, ["privacy", "report", str(layout.global_checkpoint(1)), "--json"])
    entry = json.loads(report.stdout)[0]
    assert entry["history"] == [[1.2, q, 1]] and entry["accountant"] == "gaussian"
    assert entry["epsilon"] == pytest.approx(exact_gaussian_epsilon([(1.2, 1)], 1e-5), rel=1e-4)
    amplified = RDPAccountant()
    amplified.step(noise_multiplier=1.2, sample_rate=q)
    assert entry["epsilon"] > amplified.get_epsilon(delta=1e-5)  # what a secret sample would have allowed
