"""fedlora_cli.model.training: local training and its loss: the causal-lm loss is the response tokens' mean
cross-entropy and ignores the prompt; the logit-adjusted loss is the cross-entropy of logits + tau log(the client's
label prior), and tau = 0 is the model's own loss; training leaves what the plan freezes bit-identical."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import PAIRS

from fedlora_cli.adapters.methods import plan
from fedlora_cli.adapters.roles import ROLE_LAMBDA_B, ROLE_LAMBDA_D, ROLE_PROJECTION, role_of
from fedlora_cli.data.examples import IGNORE_INDEX, Examples, encode, read_shard
from fedlora_cli.errors import FedloraError
from fedlora_cli.model.training import batch_loss, label_prior, local_train, logit_offsets
from fedlora_cli.model.workbench import build


def test_ffa_vera_local_training_leaves_lambda_d_bit_identical(kind_recipe, partition_dir):
    from fedlora_cli.data.examples import read_shard
    from fedlora_cli.model.training import local_train

    recipe = kind_recipe("vera", "ffa", r=16)
    bench = build(recipe, num_labels=2)
    before = bench.adapter_tensors()
    examples = read_shard(partition_dir / "client-0.parquet", "text", "sentiment", 2)

    local_train(bench, plan("ffa", "shared", "vera"), examples, seed=0)

    after = bench.adapter_tensors()
    for name, t in before.items():
        if role_of(name) in (ROLE_LAMBDA_D, ROLE_PROJECTION):
            assert torch.equal(after[name], t), f"{name} changed"
    assert any(not torch.equal(after[n], t) for n, t in before.items() if role_of(n) == ROLE_LAMBDA_B)


def test_loss_is_the_mean_over_examples_of_the_response_token_cross_entropy(make_causal_recipe):
    bench = build(make_causal_recipe(), None)
    batch = encode(bench.tokenizer, PAIRS, [0, 1], 64)
    with torch.no_grad():
        got = batch_loss(bench.model, batch, "causal-lm")
        logits = bench.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    per_example = []
    for k in range(2):
        targets = batch["labels"][k, 1:]
        keep = targets != IGNORE_INDEX
        ce = torch.nn.functional.cross_entropy(logits[k, :-1][keep], targets[keep])
        per_example.append(ce)
    torch.testing.assert_close(got, torch.stack(per_example).mean(), rtol=1e-5, atol=1e-6)


def test_prompt_tokens_get_no_gradient_signal_through_their_targets(make_causal_recipe):
    """Changing what follows each prompt token (the prompt's own later tokens) as a *target* changes nothing:
    replacing the label of every prompt position by any token leaves the loss as it was, since they are -100."""
    bench = build(make_causal_recipe(), None)
    batch = encode(bench.tokenizer, PAIRS, [0, 1], 64)
    with torch.no_grad():
        reference = batch_loss(bench.model, batch, "causal-lm")
        tampered = dict(batch)
        labels = batch["labels"].clone()
        labels[labels == IGNORE_INDEX] = 5  # as if prompt and padding tokens were targets
        tampered["labels"] = labels
        with_prompt = batch_loss(bench.model, tampered, "causal-lm")
    assert not torch.isclose(reference, with_prompt), "the prompt tokens would change the loss if they were targets"


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


# Logit adjustment (training.logit_adjustment) ---------------------------------------------------------------------


def test_the_adjusted_loss_is_the_cross_entropy_of_the_logits_plus_tau_log_prior(make_recipe):
    bench = build(make_recipe("fedavg", logit_adjustment=1.5), 2)
    data = Examples(["good fun film", "bad dull plot", "the story was fine", "awful"], np.array([0, 1, 1, 1]))
    batch = bench.batch(data, [0, 1, 2, 3])
    offsets = logit_offsets(bench, data)  # prior (2, 4) / 6: Laplace-smoothed counts (1, 3)
    with torch.no_grad():
        got = batch_loss(bench.model, batch, "sequence-classification", offsets)
        plain = batch_loss(bench.model, batch, "sequence-classification")
        logits = bench.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    log_prior = torch.log(torch.tensor([1 / 3, 2 / 3], dtype=torch.float64))
    by_hand = []
    for z, y in zip(logits + 1.5 * log_prior, [0, 1, 1, 1]):
        by_hand.append(torch.log(torch.exp(z).sum()) - z[y])  # -log softmax(z)[y]
    torch.testing.assert_close(got.double(), torch.stack(by_hand).mean(), rtol=1e-5, atol=1e-6)
    assert not torch.isclose(got, plain), "a skewed prior must change the loss"


def test_tau_zero_trains_exactly_as_the_models_own_cross_entropy(make_recipe, partition_dir, monkeypatch):
    from fedlora_cli.model import training

    examples = read_shard(partition_dir / "client-0.parquet", "text", "sentiment", 2)

    def trained(recipe) -> tuple[dict[str, torch.Tensor], float]:
        bench = build(recipe, 2)
        result = local_train(bench, plan("fedavg", "shared"), examples, seed=0)
        return bench.adapter_tensors(), result.loss

    plain, plain_loss = trained(make_recipe("fedavg", logit_adjustment=0.0))
    adjusted, _ = trained(make_recipe("fedavg", logit_adjustment=1.0))
    # The loss as it was before logit adjustment existed: the Hugging Face model's own cross-entropy.
    monkeypatch.setattr(training, "batch_loss", lambda model, batch, task, offsets: model(**batch).loss)
    before, before_loss = trained(make_recipe("fedavg"))
    assert plain_loss == before_loss and all(torch.equal(plain[n], before[n]) for n in before)
    assert any(not torch.equal(adjusted[n], before[n]) for n in before), "tau = 1 must train differently"


def test_the_prior_is_the_clients_own_smoothed_label_distribution(make_recipe, monkeypatch):
    """A client holding one class: tau log((count + 1) / (n + classes)), finite for the class it lacks, in every
    step's loss."""
    from fedlora_cli.model import training

    seen = []
    real = training.batch_loss
    monkeypatch.setattr(training, "batch_loss", lambda m, b, t, offsets: seen.append(offsets) or real(m, b, t, offsets))
    assert np.allclose(label_prior(np.full(10, 2), 3), [1 / 13, 1 / 13, 11 / 13])
    bench = build(make_recipe("fedavg", logit_adjustment=2.0), 2)
    data = Examples(["good fun film"] * 10, np.full(10, 1))
    local_train(bench, plan("fedavg", "shared"), data, seed=0)
    expected = 2.0 * torch.log(torch.tensor([1 / 12, 11 / 12]))
    assert len(seen) == 3 and all(torch.allclose(o, expected) for o in seen)


def test_the_adjusted_loss_is_refused_under_dp_sgd_even_for_a_recipe_built_past_validation(make_recipe):
    import dataclasses

    from fedlora_cli.recipe.schema import PrivacySection

    bench = build(make_recipe("fedavg", logit_adjustment=1.0), 2)
    data = Examples(["good fun film", "dull"], np.array([1, 0]))
    assert logit_offsets(bench, data) is not None
    private = dataclasses.replace(bench.recipe, privacy=PrivacySection(noise_multiplier=1.0, max_grad_norm=1.0))
    with pytest.raises(FedloraError, match="logit_adjustment cannot be used with DP-SGD"):
        logit_offsets(dataclasses.replace(bench, recipe=private), data)
