"""fedlora_cli.model.training: local training and its loss: the causal-lm loss is the response tokens' mean
cross-entropy and ignores the prompt; training leaves what the plan freezes bit-identical."""

from __future__ import annotations

import torch
from conftest import PAIRS

from fedlora_cli.adapters.methods import plan
from fedlora_cli.adapters.roles import ROLE_LAMBDA_B, ROLE_LAMBDA_D, ROLE_PROJECTION, role_of
from fedlora_cli.data.examples import IGNORE_INDEX, encode, read_shard
from fedlora_cli.model.training import batch_loss, local_train
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
