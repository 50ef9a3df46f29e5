"""fedlora_cli.privacy.dp_sgd: DP-SGD at a client with PEFT models (Opacus): zero noise and loose clipping is plain
training, clipping bounds the step, only the planned roles move, an empty Poisson batch is still a noisy step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import PAIRS

from fedlora_cli.adapters.methods import plan
from fedlora_cli.adapters.roles import role_of
from fedlora_cli.data.examples import encode, read_shard
from fedlora_cli.model.training import DPSettings, batch_loss, local_train
from fedlora_cli.model.workbench import build


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
    # client-1: the fixture's client-0 holds fewer than 16 reviews since the validation split
    examples = read_shard(partition_dir / "client-1.parquet", "text", "sentiment", 2)
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
    dp = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.1, secret_seed=3)
    result = local_train(bench, plan("ffa", "shared"), examples, seed=0, dp=dp)
    after = bench.adapter_tensors()
    assert result.steps == bench.recipe.training.local_steps
    moved = [n for n in before if not torch.equal(before[n], after[n])]
    assert moved and all(role_of(n) != "lora_A" for n in moved)
    assert any(role_of(n) == "lora_B" for n in moved)


def test_an_empty_poisson_batch_still_releases_noise(make_recipe, partition_dir):
    # At this sample rate nearly every step samples no example; each must still be a noisy step, as the
    # accountant counts it, never a silent no-op.
    bench = build(make_recipe("ffa", "frozen", optimizer="sgd", lr=0.1), 2)
    examples = read_shard(partition_dir / "client-0.parquet", "text", "sentiment", 2)
    before = bench.adapter_tensors()
    dp = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=1e-6, secret_seed=2)
    result = local_train(bench, plan("ffa", "frozen"), examples, seed=0, dp=dp)
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
    local_train(bench, p, examples, seed=0,
                dp=DPSettings(noise_multiplier=0.5, max_grad_norm=1.0, sample_rate=0.1, secret_seed=1))
    after = bench.adapter_tensors()
    for role in ("lora_A", "lora_B", "head"):
        moved = [not torch.equal(before[n], after[n]) for n in before if role_of(n) == role]
        if role in p.trained:
            assert any(moved), f"{role} should train under {method}/{head}"
        else:
            assert not any(moved), f"{role} must stay frozen under {method}/{head}"


def test_dp_with_zero_noise_and_loose_clipping_equals_plain_training_on_a_causal_lm(make_causal_recipe):
    """Per-example clipping must see each example's own gradient: with no noise and a clip nobody reaches,
    one DP-SGD step equals one plain step (and the weights move)."""
    from fedlora_cli.model.training import make_optimizer
    from fedlora_cli.privacy.dp_sgd import DPSGD

    r = make_causal_recipe(optimizer="sgd", lr=0.5)
    deltas = []
    for dp in (False, True):
        bench = build(r, None)
        batch = encode(bench.tokenizer, PAIRS, [0, 1], 64)
        params = bench.set_trainable(plan("fedavg", "frozen"))
        before = [q.detach().clone() for q in params]
        optimizer = make_optimizer(bench, params)
        model = bench.model
        if dp:
            engine = DPSGD(model, optimizer, 0.0, 1e6, expected_batch=2, seed=0)
            model, optimizer = engine.module, engine.optimizer
        model.train()
        batch_loss(model, batch, "causal-lm").backward()
        optimizer.step()
        if dp:
            engine.close()
        deltas.append([q.detach() - b for q, b in zip(params, before)])
    assert any(float(d.abs().max()) > 0 for d in deltas[0])
    for a, b in zip(*deltas):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
