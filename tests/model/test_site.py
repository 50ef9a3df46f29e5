"""fedlora_cli.model.site: how a site runs the model. Micro-batches and gradient checkpointing change memory, not the
step; a bfloat16 or 4-bit site trains float32 adapter tensors that aggregate with a float32 site's; DP-SGD's logical
batch is clipped and noised once however it is split; the device is chosen as documented."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FILLER, NEGATIVE, POSITIVE, make_reviews, recipe_dict

from fedlora_cli import federation, recipe as recipes, storage
from fedlora_cli.adapters.methods import plan
from fedlora_cli.data.examples import Examples, PromptResponses
from fedlora_cli.data.partition import read_source
from fedlora_cli.errors import FedloraError
from fedlora_cli.model.site import Site, resolve_device
from fedlora_cli.model.training import DPSettings, local_train
from fedlora_cli.model.workbench import Workbench, build

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def still_model_dir(tmp_path_factory) -> Path:
    """A 2-layer, 64-wide BERT without dropout, so that differently split batches must give the same step."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    path = tmp_path_factory.mktemp("still-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *POSITIVE, *NEGATIVE, *FILLER]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(path / "vocab.txt")).save_pretrained(path)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(5)
    BertForSequenceClassification(config).save_pretrained(path)
    return path


def examples(n: int = 32) -> Examples:
    frame = make_reviews(n, seed=3)
    return Examples(list(frame.text), np.array([int(s == "pos") for s in frame.sentiment]))


def site_recipe(model_dir: Path, data: Path, site: dict | None = None, privacy: dict | None = None, **training):
    raw = recipe_dict(model_dir, data, "fedavg", optimizer="sgd", lr=0.1, local_steps=1, batch_size=32, **training)
    if privacy is not None:
        raw["privacy"] = privacy
    return recipes.with_site(recipes.from_dict(raw), site or {})


def one_step(recipe, dp: DPSettings | None = None, data: Examples | None = None) -> dict[str, torch.Tensor]:
    """The change of every adapter tensor in one local step."""
    bench = build(recipe, 2)
    before = bench.adapter_tensors()
    local_train(bench, plan("fedavg", "shared"), data or examples(), seed=0, dp=dp)
    return {name: t - before[name] for name, t in bench.adapter_tensors().items()}


def assert_same_step(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rtol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    moved = [name for name in a if float(a[name].norm()) > 0]
    assert moved, "the step moved nothing: the comparison would be empty"
    for name in a:
        difference = float((a[name] - b[name]).norm())
        assert difference <= rtol * max(float(a[name].norm()), 1e-12), f"{name}: relative difference {difference}"


# Memory: micro-batches and checkpointing -------------------------------------------------------------------------


def test_four_micro_batches_of_8_give_the_step_of_one_batch_of_32(still_model_dir, reviews_csv):
    one = one_step(site_recipe(still_model_dir, reviews_csv))
    four = one_step(site_recipe(still_model_dir, reviews_csv, {"training.gradient_accumulation_steps": 4}))
    assert_same_step(one, four)


def test_uneven_micro_batches_weigh_each_example_the_same(still_model_dir, reviews_csv):
    """32 examples in micro-batches of 11, 11, 10: each weighted by its share, not as a third."""
    one = one_step(site_recipe(still_model_dir, reviews_csv))
    three = one_step(site_recipe(still_model_dir, reviews_csv, {"training.gradient_accumulation_steps": 3}))
    assert_same_step(one, three)


def test_logit_adjusted_micro_batches_sorted_by_length_give_the_step_of_one_batch(still_model_dir, reviews_csv):
    """A shard of 24 positives and 8 negatives (prior 25/34, 9/34): the adjusted step of micro-batches of 11, 11
    and 10, cut from the batch sorted by length, is the one batch's; and it is not the plain step."""
    data = examples(64)
    rows = np.r_[np.flatnonzero(data.labels == 1)[:24], np.flatnonzero(data.labels == 0)[:8]]
    assert len(rows) == 32
    skewed = Examples([data.texts[i] for i in rows], data.labels[rows])
    adjusted = site_recipe(still_model_dir, reviews_csv, logit_adjustment=1.0)
    one = one_step(adjusted, data=skewed)
    three = one_step(recipes.with_site(adjusted, {"training.gradient_accumulation_steps": 3}), data=skewed)
    assert_same_step(one, three)
    with pytest.raises(AssertionError, match="relative difference"):
        assert_same_step(one, one_step(site_recipe(still_model_dir, reviews_csv), data=skewed))


def test_micro_batches_are_cut_from_the_logical_batch_sorted_by_length(still_model_dir, reviews_csv, monkeypatch):
    """Each micro-batch pads only to its own longest example: the logical batch's examples (the same ones) are
    sorted by length before it is cut, so the padded width falls from micro-batch to micro-batch."""
    rng = np.random.default_rng(0)
    words = [*POSITIVE, *NEGATIVE]
    texts = [" ".join(rng.choice(words, size=k)) for k in rng.permutation(np.arange(1, 33))]
    data = Examples(texts, np.arange(32) % 2)
    bench = build(site_recipe(still_model_dir, reviews_csv, {"training.gradient_accumulation_steps": 4}), 2)
    seen, widths = [], []
    original = Workbench.batch

    def recording(self, examples_, rows):
        batch = original(self, examples_, rows)
        seen.append(sorted(int(r) for r in rows))
        widths.append(int(batch["input_ids"].shape[1]))
        return batch

    monkeypatch.setattr(Workbench, "batch", recording)  # a workbench is frozen: its class is spied on
    local_train(bench, plan("fedavg", "shared"), data, seed=0)
    assert sorted(r for piece in seen for r in piece) == list(range(32))  # every example, once
    assert widths == sorted(widths, reverse=True) and widths[0] > widths[-1]
    longest = sorted(range(32), key=lambda i: -len(texts[i]))[:8]
    # the first micro-batch holds the 8 longest examples (compared by length: ties may be broken either way)
    assert sorted(len(texts[i]) for i in seen[0]) == sorted(len(texts[i]) for i in longest)


def test_causal_lm_micro_batches_give_the_step_of_one_batch(make_causal_recipe):
    """Examples of different lengths: each weighs the same in the logical batch, whichever micro-batch holds it."""

    def step(accumulation: int):
        r = make_causal_recipe(optimizer="sgd", lr=0.1, local_steps=1, batch_size=8)
        r = recipes.with_site(r, {"training.gradient_accumulation_steps": accumulation})
        bench = build(r, None)
        frame = read_source(r.data.source).head(8)
        data = PromptResponses(list(frame[r.data.prompt_column]), list(frame[r.data.response_column]))
        before = bench.adapter_tensors()
        local_train(bench, plan("fedavg", "frozen"), data, seed=0)
        return {n: t - before[n] for n, t in bench.adapter_tensors().items()}

    assert_same_step(step(1), step(4))


def test_gradient_checkpointing_gives_the_same_step(still_model_dir, reviews_csv):
    plain = one_step(site_recipe(still_model_dir, reviews_csv))
    checkpointed = one_step(site_recipe(still_model_dir, reviews_csv, {"training.gradient_checkpointing": True}))
    assert_same_step(plain, checkpointed)


# DP-SGD's logical batches ------------------------------------------------------------------------------------------


def test_dp_logical_batch_in_four_micro_batches_with_no_noise_is_the_plain_logical_batch(still_model_dir, reviews_csv):
    """Sample rate 1 (32 of 32 examples, the expected batch), noise 0, a clipping norm too large to bind: DP-SGD's
    step over 4 micro-batches is the plain step of the whole batch."""
    privacy = {"noise_multiplier": 0.0, "max_grad_norm": 1e6, "delta": 1e-3}
    dp = DPSettings(noise_multiplier=0.0, max_grad_norm=1e6, sample_rate=1.0, secret_seed=3)
    plain = one_step(site_recipe(still_model_dir, reviews_csv))
    private = one_step(site_recipe(still_model_dir, reviews_csv, {"training.gradient_accumulation_steps": 4},
                                   privacy=privacy), dp=dp)
    assert_same_step(plain, private)


def test_dp_logical_batch_noise_is_added_once_per_logical_step(still_model_dir, reviews_csv):
    """With noise, the same secret seed gives the same step however the logical batch is split: one noise draw
    per logical step, not one per micro-batch (which would also multiply the noise by sqrt(micro-batches))."""
    privacy = {"noise_multiplier": 1.0, "max_grad_norm": 0.5, "delta": 1e-3}
    dp = DPSettings(noise_multiplier=1.0, max_grad_norm=0.5, sample_rate=0.5, secret_seed=11)
    whole = one_step(site_recipe(still_model_dir, reviews_csv, privacy=privacy), dp=dp)
    split = one_step(site_recipe(still_model_dir, reviews_csv, {"training.gradient_accumulation_steps": 4},
                                 privacy=privacy), dp=dp)
    assert_same_step(whole, split, rtol=1e-4)


def test_the_ledger_counts_logical_steps(still_model_dir, reviews_csv, partition_dir, tmp_path):
    raw = recipe_dict(still_model_dir, reviews_csv, "ffa", optimizer="sgd", lr=0.1, local_steps=3, batch_size=16)
    raw["privacy"] = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-3}
    g0 = federation.init(recipes.from_dict(raw), tmp_path / "g0",
                         partition=json.loads((partition_dir / "partition.json").read_text()))
    written = federation.train_client(g0, partition_dir / "client-0.parquet", tmp_path / "state", tmp_path / "u",
                                      "client-0", site={"training.gradient_accumulation_steps": 4})
    history = written.state.manifest.privacy["history"]
    assert [steps for _, _, steps in history] == [3]
    assert written.update.manifest.steps == 3
    assert written.update.manifest.site["accumulation_steps"] == 4


# Precision and quantisation: sites that load the base differently federate ------------------------------------------


def _round_with_sites(model_dir, data_csv, partition_dir, tmp_path, sites: dict[str, dict]):
    """Round 1 of a FedAvg-LoRA federation where each client loads the base its own way; returns the updates."""
    raw = recipe_dict(model_dir, data_csv, "fedavg", optimizer="adamw", lr=0.01, local_steps=2, batch_size=8)
    g0 = federation.init(recipes.from_dict(raw), tmp_path / "g0",
                         partition=json.loads((partition_dir / "partition.json").read_text()))
    updates = {}
    for client_id, site in sites.items():
        written = federation.train_client(g0, partition_dir / f"{client_id}.parquet", tmp_path / "states" / client_id,
                                          tmp_path / "updates" / client_id, client_id, site=site)
        updates[client_id] = written.update
    return g0, updates


@pytest.mark.parametrize("site", [{"model.dtype": "bfloat16"}, {"model.quantization": "4bit"}],
                         ids=["bfloat16", "4bit-nf4"])
def test_a_low_precision_site_trains_float32_tensors_that_aggregate_with_a_float32_site(
    still_model_dir, reviews_csv, partition_dir, tmp_path, site
):
    g0, updates = _round_with_sites(still_model_dir, reviews_csv, partition_dir, tmp_path,
                                    {"client-0": site, "client-1": {}})
    low, full = updates["client-0"], updates["client-1"]
    sent = storage.load_tensors(low.tensors_path, "client update")
    assert {t.dtype for t in sent.values()} == {torch.float32}
    moved = {n for n, t in sent.items() if not torch.equal(t, g0.verified_tensors[n])}
    assert any("lora_B" in n for n in moved) and any("classifier" in n for n in moved)
    assert low.manifest.base_fingerprint == full.manifest.base_fingerprint
    result = federation.aggregate_round(g0, [low.path, full.path], tmp_path / "g1")
    assert {c.client_id for c in result.clients} == {"client-0", "client-1"}
    assert all(torch.isfinite(t).all() for t in result.checkpoint.tensors().values())


def test_a_bfloat16_base_holds_bfloat16_weights_and_a_float32_adapter_and_head(still_model_dir, reviews_csv):
    bench = build(site_recipe(still_model_dir, reviews_csv, {"model.dtype": "bfloat16"}), 2)
    base = dict(bench.model.named_parameters())
    query = next(p for n, p in base.items() if n.endswith("attention.self.query.base_layer.weight"))
    assert query.dtype == torch.bfloat16
    trained = {n: p for n, p in base.items() if "lora_" in n or "modules_to_save" in n}
    assert trained and {p.dtype for p in trained.values()} == {torch.float32}


def test_a_4bit_base_quantises_its_layers_but_never_the_head(still_model_dir, reviews_csv):
    import bitsandbytes as bnb

    bench = build(site_recipe(still_model_dir, reviews_csv, {"model.quantization": "4bit"}), 2)
    modules = dict(bench.model.named_modules())
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in modules.values())
    heads = [m for n, m in modules.items() if n.endswith("classifier.modules_to_save.default")]
    assert heads and all(type(m) is torch.nn.Linear and m.weight.dtype == torch.float32 for m in heads)


def test_sites_loading_the_same_base_differently_share_its_fingerprint_and_another_base_does_not(
    still_model_dir, tiny_model_dir, reviews_csv
):
    prints = {
        name: build(site_recipe(still_model_dir, reviews_csv, site), 2).fingerprint
        for name, site in {"float32": {}, "bfloat16": {"model.dtype": "bfloat16"},
                           "4bit": {"model.quantization": "4bit"}, "8bit": {"model.quantization": "8bit"}}.items()
    }
    assert len(set(prints.values())) == 1, prints
    assert build(site_recipe(tiny_model_dir, reviews_csv), 2).fingerprint != prints["float32"]


def test_export_merge_of_a_4bit_federation_is_a_plain_float32_model(still_model_dir, reviews_csv, partition_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from fedlora_cli.export import export

    g0, updates = _round_with_sites(still_model_dir, reviews_csv, partition_dir, tmp_path,
                                    {"client-0": {"model.quantization": "4bit"}})
    federation.aggregate_round(g0, [updates["client-0"].path], tmp_path / "g1")
    export(tmp_path / "g1", tmp_path / "merged", merge=True)
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    assert getattr(merged.config, "quantization_config", None) is None
    assert {p.dtype for p in merged.parameters()} == {torch.float32}
    assert all(type(m).__module__.startswith(("torch", "transformers")) for m in merged.modules())


# The device -------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: auto picks it")
def test_auto_picks_the_cpu_without_a_gpu(make_recipe):
    assert resolve_device("auto") == "cpu"
    assert build(make_recipe(), 2).site.device == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_asking_for_cuda_without_one_is_one_clear_line():
    with pytest.raises(FedloraError, match="no CUDA device"):
        resolve_device("cuda:0")


@requires_cuda
def test_cuda_site_trains_and_sends_cpu_float32_tensors(still_model_dir, reviews_csv):
    recipe = site_recipe(still_model_dir, reviews_csv, {"training.device": "cuda", "training.mixed_precision": "bf16"})
    bench = build(recipe, 2)
    assert next(bench.model.parameters()).device.type == "cuda"
    local_train(bench, plan("fedavg", "shared"), examples(), seed=0)
    tensors = bench.adapter_tensors()
    assert {t.device.type for t in tensors.values()} == {"cpu"} and {t.dtype for t in tensors.values()} == {torch.float32}


@requires_cuda
def test_cuda_dp_sgd_draws_its_noise_on_the_gpu(still_model_dir, reviews_csv):
    privacy = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-3}
    recipe = site_recipe(still_model_dir, reviews_csv, {"training.device": "cuda"}, privacy=privacy)
    step = one_step(recipe, dp=DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5, secret_seed=1))
    assert any(float(t.norm()) > 0 for t in step.values())


# Settings a site cannot combine ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("site", "federation_keys", "privacy", "message"),
    [
        ({"model.quantization": "4bit"}, {"aggregation": "exact"}, None, "base weights, which a quantised base"),
        ({"training.mixed_precision": "fp16"}, {}, {"noise_multiplier": 1.0}, "'fp16' cannot be used with DP-SGD"),
        ({"training.gradient_checkpointing": True}, {}, {"noise_multiplier": 1.0}, "checkpointing discards"),
        ({"training.device": "gpu"}, {}, None, "must be one of auto, cpu, cuda, mps or 'cuda:N'"),
        ({"training.gradient_accumulation_steps": 64}, {}, None, "at most training.batch_size"),
        ({"model.quantization": "2bit"}, {}, None, "must be one of none, 4bit, 8bit"),
    ],
)
def test_settings_a_site_cannot_use_are_refused_by_name(tiny_model_dir, reviews_csv, site, federation_keys, privacy,
                                                      message):
    raw = recipe_dict(tiny_model_dir, reviews_csv)
    raw["federation"].update(federation_keys)
    if privacy is not None:
        raw["privacy"] = privacy
    with pytest.raises(FedloraError, match=message):
        recipes.with_site(recipes.from_dict(raw), site)


def test_a_site_option_is_named_as_the_user_typed_it(make_recipe):
    with pytest.raises(FedloraError, match="^--device must be one of"):
        recipes.with_site(make_recipe(), {"training.device": "tpu"}, {"training.device": "--device"})


def test_only_site_settings_can_differ_by_site(make_recipe):
    with pytest.raises(FedloraError, match="'training.lr' is not a site setting"):
        recipes.with_site(make_recipe(), {"training.lr": 0.5})


def test_site_settings_are_not_part_of_the_federations_recipe_digest(make_recipe):
    r = make_recipe()
    site = recipes.with_site(r, {"model.dtype": "bfloat16", "training.gradient_accumulation_steps": 2})
    assert site.digest() == r.digest()
    assert recipes.with_site(r, {}).digest() == r.digest()
    import dataclasses

    assert dataclasses.replace(r, training=dataclasses.replace(r.training, lr=0.02)).digest() != r.digest()


def test_a_site_describes_itself_in_one_line(make_recipe):
    site = Site.of(recipes.with_site(make_recipe(), {"model.quantization": "4bit", "training.gradient_accumulation_steps": 2}))
    assert site.describe() == f"{site.device} · base 4bit nf4 (bfloat16 compute) · 2 micro-batches"


def test_a_quantised_base_without_bitsandbytes_names_the_extra(make_recipe, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes now raises ImportError
    site = Site.of(recipes.with_site(make_recipe(), {"model.quantization": "4bit"}))
    with pytest.raises(FedloraError, match=r"needs bitsandbytes: pip install 'fedlora\[quantization\]'"):
        site.load_kwargs("sequence-classification")
