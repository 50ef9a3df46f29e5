"""fedlora_cli.model.pooling: with model.pooling 'mean' the head reads the mean of the real tokens' last hidden
states, whatever the padding; the methods still train only what they train; an encoder without a pooler is
refused in one line."""

from __future__ import annotations

import pytest
import torch
from conftest import recipe_dict

from fedlora_cli import recipe as recipes
from fedlora_cli.adapters.methods import plan
from fedlora_cli.errors import FedloraError
from fedlora_cli.model import pooling
from fedlora_cli.model.workbench import build


def tiny_bert() -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, num_labels=2)
    return BertForSequenceClassification(config).eval()


def test_the_head_reads_the_mean_of_the_unmasked_tokens():
    model = tiny_bert()
    ids = torch.tensor([[2, 7, 9, 11, 3], [2, 8, 3, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with torch.no_grad():
        default = model(input_ids=ids, attention_mask=mask).logits
        pooling.install(model)
        logits = model(input_ids=ids, attention_mask=mask).logits
        hidden = model.bert(input_ids=ids, attention_mask=mask).last_hidden_state
    expected = torch.stack([hidden[0].mean(dim=0), hidden[1, :3].mean(dim=0)])
    assert torch.allclose(logits, model.classifier(expected), atol=1e-6)
    assert not torch.allclose(logits, default, atol=1e-3)  # the pooler really was replaced


def test_padding_leaves_an_examples_logits_unchanged():
    model = tiny_bert()
    pooling.install(model)
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([[2, 8, 3]]), attention_mask=torch.ones(1, 3, dtype=torch.long)).logits
        padded = model(input_ids=torch.tensor([[2, 8, 3, 0, 0, 0], [2, 7, 9, 11, 12, 3]]),
                       attention_mask=torch.tensor([[1, 1, 1, 0, 0, 0], [1] * 6])).logits
    assert torch.allclose(padded[0], alone[0], atol=1e-5)


def test_the_pooler_has_no_weights_and_ffa_trains_only_b_and_the_head(tiny_model_dir, reviews_csv):
    raw = recipe_dict(tiny_model_dir, reviews_csv, "ffa")
    raw["model"]["pooling"] = "mean"
    bench = build(recipes.from_dict(raw), num_labels=2)
    bench.set_trainable(plan("ffa", "shared", "lora"))
    names = [n for n, _ in bench.model.named_parameters()]
    assert not any(".pooler." in n for n in names)
    trained = [n for n, p in bench.model.named_parameters() if p.requires_grad]
    assert trained and all("lora_B" in n or "classifier" in n for n in trained)
    assert any("classifier" in n for n in trained) and any("lora_B" in n for n in trained)


def test_an_encoder_without_a_pooler_is_refused_by_name(tmp_path, tiny_model_dir, reviews_csv):
    from transformers import DistilBertConfig, DistilBertForSequenceClassification, DistilBertTokenizerFast

    tokenizer = DistilBertTokenizerFast(vocab_file=str(tiny_model_dir / "vocab.txt"))
    tokenizer.save_pretrained(tmp_path)
    config = DistilBertConfig(vocab_size=tokenizer.vocab_size, dim=16, n_layers=1, n_heads=2, hidden_dim=32,
                              max_position_embeddings=32)
    DistilBertForSequenceClassification(config).save_pretrained(tmp_path)
    raw = recipe_dict(tmp_path, reviews_csv, "ffa")
    raw["model"]["pooling"] = "mean"
    raw["adapter"]["target_modules"] = ["q_lin", "v_lin"]
    message = r"model\.pooling 'mean': DistilBertForSequenceClassification has no BERT-style pooler"
    with pytest.raises(FedloraError, match=message):
        build(recipes.from_dict(raw), num_labels=2)


def test_a_bfloat16_base_pools_in_float32_and_feeds_the_float32_head(tiny_model_dir, reviews_csv):
    raw = recipe_dict(tiny_model_dir, reviews_csv, "ffa")
    raw["model"].update(pooling="mean", dtype="bfloat16")
    bench = build(recipes.from_dict(raw), num_labels=2)
    batch = bench.tokenizer(["good film", "a really very dull and boring plot"], padding=True, return_tensors="pt")
    seen = {}
    pooler = bench.model.get_base_model().bert.pooler
    pooler.register_forward_hook(lambda _m, args, out: seen.update(states=args[0], out=out))
    with torch.no_grad():
        logits = bench.model(**batch).logits
    assert seen["states"].dtype == torch.bfloat16 and logits.dtype == torch.float32
    assert torch.isfinite(logits).all() and logits.shape == (2, 2)
    # Rounded once: within half a bfloat16 step (2^-8 relative) of the exact mean, which a bfloat16 sum is not.
    keep = batch["attention_mask"][:, :, None].double()
    exact = (seen["states"].double() * keep).sum(dim=1) / keep.sum(dim=1)
    assert ((seen["out"].double() - exact).abs() <= exact.abs() * 2**-8 + 1e-12).all()


def test_a_deep_copy_pools_with_its_own_mask():
    import copy

    model = tiny_bert()
    pooling.install(model)
    twin = copy.deepcopy(model)
    ids = torch.tensor([[2, 8, 3, 0, 0, 0], [2, 7, 9, 11, 12, 3]])
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1] * 6])
    with torch.no_grad():
        alone = twin(input_ids=ids[:1, :3], attention_mask=mask[:1, :3]).logits
        padded = twin(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(padded[0], alone[0], atol=1e-5)


def test_an_albert_pooler_fed_only_the_first_token_is_not_replaced():
    from transformers import AlbertConfig, AlbertForSequenceClassification

    config = AlbertConfig(vocab_size=40, embedding_size=8, hidden_size=16, num_hidden_layers=1,
                          num_attention_heads=2, intermediate_size=32, max_position_embeddings=32)
    with pytest.raises(ValueError, match="no BERT-style pooler"):
        pooling.install(AlbertForSequenceClassification(config))


def test_max_and_cls_pooling_read_the_masked_maximum_and_the_first_token():
    ids = torch.tensor([[2, 7, 9, 11, 3], [2, 8, 3, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    for mode in ("max", "cls"):
        model = tiny_bert()
        pooling.install(model, mode)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
            hidden = model.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        if mode == "max":
            expected = torch.stack([hidden[0].amax(dim=0), hidden[1, :3].amax(dim=0)])
        else:
            expected = hidden[:, 0]
        assert torch.allclose(logits, model.classifier(expected), atol=1e-6), mode


def test_an_unknown_pooling_mode_is_refused():
    with pytest.raises(ValueError, match="'sum' is not one of mean, max, cls"):
        pooling.install(tiny_bert(), "sum")
