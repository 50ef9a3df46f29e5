"""The methods' defining invariants, checked on the files a tiny federation writes.

FFA-LoRA: A never changes and never travels; its LoRA upload is half of FedAvg-LoRA's.
FedSA-LoRA: B never travels, differs per client, survives across rounds, and drives personalised evaluation.
FedAvg-LoRA: the aggregate is the weighted mean of the client updates, computed here independently.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedlora_cli import federation, storage
from fedlora_cli.adapters.roles import role_of

CLIENTS = ["client-0", "client-1", "client-2"]


def weights_of(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / storage.ADAPTER_WEIGHTS))


def update_tensors(layout, round_: int, client: str) -> dict[str, torch.Tensor]:
    return load_file(str(layout.update(round_, client) / storage.UPDATE_TENSORS))


def lora_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for n, t in tensors.items() if role_of(n) in ("lora_A", "lora_B"))


def test_ffa_keeps_a_bit_identical_and_never_sends_it(make_recipe, run_federation):
    layout = run_federation(make_recipe("ffa"))
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


def test_ffa_lora_upload_is_exactly_half_of_fedavg(make_recipe, run_federation):
    ffa = run_federation(make_recipe("ffa"), "ffa")
    fedavg = run_federation(make_recipe("fedavg"), "fedavg")
    ffa_bytes = lora_bytes(update_tensors(ffa, 1, "client-0"))
    fedavg_bytes = lora_bytes(update_tensors(fedavg, 1, "client-0"))
    assert ffa_bytes > 0
    assert 2 * ffa_bytes == fedavg_bytes


def test_fedsa_keeps_b_home_and_personalises(make_recipe, run_federation):
    layout = run_federation(make_recipe("fedsa"))
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


def test_personalised_evaluation_uses_the_clients_b(make_recipe, run_federation):
    layout = run_federation(make_recipe("fedsa"))
    g = layout.global_checkpoint(2)
    test = layout.data
    global_metrics = federation.evaluate(g, test)
    per_client = [federation.evaluate(g, test, state_dir=layout.state(c), client_id=c) for c in CLIENTS]
    losses = {round(m["loss"], 6) for m in per_client}
    assert len(losses) == 3, "each client's personalised model is different"
    assert all(m["personalised"] for m in per_client) and not global_metrics["personalised"]
    # Loading the same tensors by hand gives the same model.
    bench, _ = federation.load_for_evaluation(g, layout.state("client-1"), "client-1")
    kept = load_file(str(layout.state("client-1") / "round-002" / storage.STATE_TENSORS))
    current = bench.adapter_tensors()
    assert all(torch.equal(current[n], t) for n, t in kept.items())


def test_fedavg_aggregate_is_the_weighted_mean(make_recipe, run_federation):
    layout = run_federation(make_recipe("fedavg"))
    manifests = [storage.read_update(layout.update(2, c)).manifest for c in CLIENTS]
    n = torch.tensor([m.num_examples for m in manifests], dtype=torch.float64)
    p = n / n.sum()
    updates = [update_tensors(layout, 2, c) for c in CLIENTS]
    result = weights_of(layout.global_checkpoint(2))
    for name in updates[0]:
        expected = sum(p[k] * updates[k][name].double() for k in range(len(CLIENTS)))
        torch.testing.assert_close(result[name].double(), expected, rtol=1e-6, atol=1e-7)
    # Head is shared too, so everything is in the update.
    assert set(updates[0]) == set(result)


@pytest.mark.parametrize("method", ["fedavg", "ffa", "fedsa"])
def test_identical_updates_are_a_fixed_point(method, make_recipe, run_federation, tmp_path):
    layout = run_federation(make_recipe(method))
    source = layout.update(1, "client-0")
    copies = []
    for k, n in enumerate((5, 50, 500)):
        copy = tmp_path / f"copy-{k}"
        update = storage.read_update(source)
        m = update.manifest
        m.client_id, m.num_examples, m.shard_examples = f"copy-{k}", n, n
        storage.write_update(copy, m, load_file(str(source / storage.UPDATE_TENSORS)))
        copies.append(copy)
    out = tmp_path / "agg"
    federation.aggregate_round(layout.global_checkpoint(0), copies, out)
    sent = update_tensors(layout, 1, "client-0")
    got = weights_of(out)
    for name, t in sent.items():
        torch.testing.assert_close(got[name], t, rtol=1e-6, atol=1e-7)


def test_weights_follow_example_counts(make_recipe, run_federation, tmp_path):
    layout = run_federation(make_recipe("fedavg"))
    result = federation.aggregate_round(
        layout.global_checkpoint(0), [layout.update(1, c) for c in CLIENTS], tmp_path / "again"
    )
    counts = [storage.read_update(layout.update(1, c)).manifest.num_examples for c in CLIENTS]
    assert [r.weight for r in result.clients] == pytest.approx([c / sum(counts) for c in counts])
    shard = federation.aggregate_round(
        layout.global_checkpoint(0), [layout.update(1, c) for c in CLIENTS], tmp_path / "shard", weighting="shard"
    )
    sizes = [r.shard_examples for r in shard.clients]
    assert [r.weight for r in shard.clients] == pytest.approx([s / sum(sizes) for s in sizes])
    uniform = federation.aggregate_round(
        layout.global_checkpoint(0), [layout.update(1, c) for c in CLIENTS], tmp_path / "uniform", weighting="uniform"
    )
    assert [r.weight for r in uniform.clients] == pytest.approx([1 / 3] * 3)


def test_global_checkpoint_loads_in_vanilla_peft(make_recipe, run_federation, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    layout = run_federation(make_recipe("fedavg"))
    g = layout.global_checkpoint(2)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    model = PeftModel.from_pretrained(base, str(g))
    model.eval()
    bench, _ = federation.load_for_evaluation(g)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    batch = tok(["the movie was good", "awful boring film"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, bench.model(**batch).logits, rtol=0, atol=1e-5)


def test_training_is_reproducible(make_recipe, run_federation):
    a = run_federation(make_recipe("fedsa"), "a")
    b = run_federation(make_recipe("fedsa"), "b")
    for client in CLIENTS:
        ma = storage.read_update(a.update(2, client)).manifest
        mb = storage.read_update(b.update(2, client)).manifest
        assert ma.tensor_digests == mb.tensor_digests
    assert storage.read_global(a.global_checkpoint(2)).manifest.digest == storage.read_global(
        b.global_checkpoint(2)
    ).manifest.digest
