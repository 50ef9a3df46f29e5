"""fedlora_cli.export.exporter: adapter and merged exports that plain PEFT and transformers load with fedlora's
logits (or generate fedlora's tokens from), and bad input: one line, exit 1, nothing written."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import causal_recipe_dict
from safetensors import safe_open
from safetensors.torch import load_file

from export.helpers import (
    LAST,
    card_of,
    fails,
    fedlora_logits,
    load_adapter_plainly,
    load_merged_plainly,
    logits,
    no_leftovers,
    ok,
    runner,
)
from fedlora_cli import export as exports, federation, recipe as recipes, storage
from fedlora_cli.cli import app
from fedlora_cli.data import partition
from fedlora_cli.data.examples import read_examples
from fedlora_cli.export import exporter
from fedlora_cli.model import evaluation


@pytest.mark.parametrize("method", ["fedavg", "ffa", "fedsa"])
def test_adapter_export_loads_in_plain_peft_with_fedlora_logits(method, federation_of, tmp_path, tiny_model_dir):
    layout = federation_of(method)
    g = layout.global_checkpoint(LAST)
    out = tmp_path / "adapter"
    ok([g, "--out", out])
    written = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "tokenizer_config.json"} <= written
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model_dir.resolve())
    model, tokenizer = load_adapter_plainly(out)
    exported, expected = logits(model, tokenizer), fedlora_logits(g)
    torch.testing.assert_close(exported, expected, atol=1e-5, rtol=0)
    # The comparison means something: the federation moved the model away from the bare base.
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    assert (logits(base, tokenizer) - exported).abs().max() > 1e-4


def test_adapter_points_to_the_base_it_was_exported_from(federation_of, tmp_path, tiny_model_dir, monkeypatch):
    g = federation_of("ffa").global_checkpoint(LAST)
    # --base-model, given relative to the working folder, is written as an absolute path.
    shutil.copytree(tiny_model_dir, tmp_path / "site-copy")
    monkeypatch.chdir(tmp_path)
    ok([g, "--out", "by-override", "--base-model", "site-copy"])
    config = json.loads((tmp_path / "by-override" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((tmp_path / "site-copy").resolve())
    load_adapter_plainly(tmp_path / "by-override")
    # A 'pkg:' base is written as the folder inside the installed package, never as 'pkg:...'.
    package = tmp_path / "site" / "fakeassets"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    shutil.copytree(tiny_model_dir, package / "model")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    moved = tmp_path / "pkg-checkpoint"
    shutil.copytree(g, moved)
    data = json.loads((moved / storage.GLOBAL_MANIFEST).read_text())
    data["recipe"]["model"]["base"] = data["base_model"] = "pkg:fakeassets/model"
    (moved / storage.GLOBAL_MANIFEST).write_text(json.dumps(data))
    ok([moved, "--out", tmp_path / "by-pkg"])
    config = json.loads((tmp_path / "by-pkg" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((package / "model").resolve())
    model, tokenizer = load_adapter_plainly(tmp_path / "by-pkg")
    torch.testing.assert_close(logits(model, tokenizer), fedlora_logits(g), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["fedavg", "ffa", "fedsa"])
def test_merged_export_is_a_plain_transformers_model_with_the_same_logits(method, federation_of, tmp_path):
    layout = federation_of(method)
    g = layout.global_checkpoint(LAST)
    ok([g, "--out", tmp_path / "adapter"])
    ok([g, "--out", tmp_path / "merged", "--merge"])
    merged, tokenizer = load_merged_plainly(tmp_path / "merged")
    assert merged.config.id2label == {0: "neg", 1: "pos"} and merged.config.label2id == {"neg": 0, "pos": 1}
    adapter, _ = load_adapter_plainly(tmp_path / "adapter")
    torch.testing.assert_close(logits(merged, tokenizer), logits(adapter, tokenizer), atol=1e-4, rtol=0)
    torch.testing.assert_close(logits(merged, tokenizer), fedlora_logits(g), atol=1e-4, rtol=0)
    front, _, _ = card_of(tmp_path / "merged")
    assert front["library_name"] == "transformers"


def test_a_merged_export_shows_no_progress_bar_of_transformers(federation_of, tmp_path, capfd):
    # Building the workbench no longer silences transformers for the rest of the process: the export's own
    # writing does, for its duration.
    result = runner.invoke(app, ["export", str(federation_of("fedavg").global_checkpoint(LAST)), "--out",
                                 str(tmp_path / "merged"), "--merge"])
    assert result.exit_code == 0, result.output
    shown = result.output + "".join(capfd.readouterr())
    assert "Writing model shards" not in shown and "it/s" not in shown, shown


def test_personalised_fedsa_export_carries_the_clients_b_and_head(federation_of, tmp_path):
    layout = federation_of("fedsa", "local")
    g, state = layout.global_checkpoint(LAST), layout.state("client-1")
    ok([g, "--out", tmp_path / "global"])
    ok([g, "--out", tmp_path / "adapter", "--state", state, "--client-id", "client-1"])
    ok([g, "--out", tmp_path / "merged", "--state", state, "--merge"])
    # In a simulate run the client id alone finds the state folder.
    ok([g, "--out", tmp_path / "by-id", "--client-id", "client-1"])

    expected = fedlora_logits(g, state)
    adapter, tokenizer = load_adapter_plainly(tmp_path / "adapter")
    torch.testing.assert_close(logits(adapter, tokenizer), expected, atol=1e-5, rtol=0)
    by_id, _ = load_adapter_plainly(tmp_path / "by-id")
    torch.testing.assert_close(logits(by_id, tokenizer), expected, atol=1e-5, rtol=0)
    merged, _ = load_merged_plainly(tmp_path / "merged")
    torch.testing.assert_close(logits(merged, tokenizer), expected, atol=1e-4, rtol=0)
    global_model, _ = load_adapter_plainly(tmp_path / "global")
    assert (logits(global_model, tokenizer) - expected).abs().max() > 1e-4, "the client's B and head were not exported"

    kept = storage.latest_state(state, LAST + 1).tensors()
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert kept and all(torch.equal(saved[name], t) for name, t in kept.items())
    front, body, _ = card_of(tmp_path / "adapter")
    assert "personalized" in front["tags"] and "personalised for client-1" in body
    _, global_body, _ = card_of(tmp_path / "global")
    assert "--state" in global_body  # the global FedSA model's B is still zero: the card says so


@pytest.mark.parametrize("dtype, code", [("float16", "F16"), ("bfloat16", "BF16")])
def test_dtype_sets_the_saved_dtype(dtype, code, federation_of, tmp_path):
    layout = federation_of("fedavg")
    g = layout.global_checkpoint(LAST)
    ok([g, "--out", tmp_path / "merged", "--merge", "--dtype", dtype])
    ok([g, "--out", tmp_path / "adapter", "--dtype", dtype])
    for path in (tmp_path / "merged" / "model.safetensors", tmp_path / "adapter" / "adapter_model.safetensors"):
        with safe_open(str(path), framework="pt") as handle:
            dtypes = {str(handle.get_slice(name).get_dtype()) for name in handle.keys()}
        assert dtypes == {code}, (path.name, dtypes)
    merged, tokenizer = load_merged_plainly(tmp_path / "merged")
    assert next(merged.parameters()).dtype == getattr(torch, dtype)
    torch.testing.assert_close(logits(merged, tokenizer), fedlora_logits(g), atol=0.05, rtol=0.05)
    adapter, _ = load_adapter_plainly(tmp_path / "adapter")
    torch.testing.assert_close(logits(adapter, tokenizer), fedlora_logits(g), atol=0.05, rtol=0.05)


@pytest.fixture
def fedsa_run(cached_federation, tiny_causal_dir, math_jsonl):
    """A finished causal-lm FedSA federation (cached for the session); tests only read it."""
    raw = causal_recipe_dict(tiny_causal_dir, math_jsonl, "fedsa", lr=0.05)
    raw["training"]["eval_batch_size"] = 1  # one prompt per generate call, as the plain loop below does
    return cached_federation(recipes.from_dict(raw))


def plain_generate(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
    """What a user without fedlora writes: chat template, greedy generate, new tokens up to EOS."""
    out = []
    for prompt in prompts:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
        inputs = tokenizer(text, add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new = output[0, inputs["input_ids"].shape[1]:].tolist()
        out.append(new[: new.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in new else new)
    return out


@pytest.mark.parametrize("merge", [False, True])
def test_export_generates_the_tokens_fedlora_evaluates(merge, fedsa_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    g = fedsa_run.global_checkpoint(2)
    state = fedsa_run.state("client-1")
    out = tmp_path / ("merged" if merge else "adapter")
    exports.export(g, out, state_dir=state, merge=merge)
    bench, _ = federation.load_for_evaluation(g, state)
    test = read_examples(fedsa_run.data / partition.TEST_SHARD, bench.recipe.data, "causal-lm", None)
    rows = np.arange(5)
    expected = [gen.tokens for gen in evaluation.generate(bench, test, rows, 12)]
    tokenizer = AutoTokenizer.from_pretrained(out)
    if merge:
        assert not (out / "adapter_config.json").exists()
        model = AutoModelForCausalLM.from_pretrained(out).eval()
    else:
        config = json.loads((out / "adapter_config.json").read_text())
        assert config["task_type"] == "CAUSAL_LM"
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"]), out).eval()
    assert any(expected), "the tiny model generates something before EOS"
    got = plain_generate(model, tokenizer, [test.prompts[i] for i in rows], 12)
    assert got == expected
    # The personalised model is not the global one: FedSA's B is the client's own.
    global_bench, _ = federation.load_for_evaluation(g)
    assert not all(torch.equal(a, b) for a, b in zip(global_bench.adapter_tensors().values(), bench.adapter_tensors().values()))
    card = (out / "README.md").read_text()
    assert "pipeline_tag: text-generation" in card and "AutoModelForCausalLM" in card and "classifier" not in card


# --------------------------------------------------------------------------------------------------------
# Bad input: one line, exit 1, nothing written


@pytest.fixture
def ffa_run(federation_of):
    return federation_of("ffa")


def test_non_empty_output_needs_overwrite(ffa_run, tmp_path):
    g = ffa_run.global_checkpoint(LAST)
    out = tmp_path / "export"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    fails([g, "--out", out], "not empty", "--overwrite")
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    ok([g, "--out", out, "--overwrite"])
    assert not (out / "keep.txt").exists() and (out / "adapter_model.safetensors").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    ok([g, "--out", empty])  # an empty folder is not in the way
    assert (empty / "adapter_model.safetensors").is_file()
    no_leftovers(tmp_path, "export")


def test_output_must_not_hold_the_checkpoint(ffa_run, tmp_path):
    g = tmp_path / "global" / "round-002"  # a copy: a bug here must not delete the module's shared run
    shutil.copytree(ffa_run.global_checkpoint(LAST), g)
    before = sorted(p.name for p in g.iterdir())
    fails([g, "--out", g, "--overwrite"], "must lie outside")
    fails([g, "--out", g.parent, "--overwrite"], "must lie outside")
    assert sorted(p.name for p in g.iterdir()) == before


@pytest.mark.parametrize("case", ["missing", "empty", "other-client", "unknown-id", "id-outside-run"])
def test_client_without_state(case, ffa_run, tmp_path):
    g = ffa_run.global_checkpoint(LAST)
    out = tmp_path / "export"
    if case == "missing":
        fails([g, "--out", out, "--state", tmp_path / "nope"], "client state not found")
    elif case == "empty":
        (tmp_path / "empty").mkdir()
        fails([g, "--out", out, "--state", tmp_path / "empty"], "holds no trained round")
    elif case == "other-client":
        args = [g, "--out", out, "--state", ffa_run.state("client-0"), "--client-id", "client-1"]
        fails(args, "belongs to client 'client-0'")
    elif case == "unknown-id":
        fails([g, "--out", out, "--client-id", "client-9"], "client 'client-9' has no state")
    else:
        lone = tmp_path / "lone"
        shutil.copytree(g, lone)
        fails([lone, "--out", out, "--client-id", "client-0"], "needs --state")
    assert not out.exists()
    no_leftovers(tmp_path, "export")


def test_missing_base_model(ffa_run, tmp_path):
    g = ffa_run.global_checkpoint(LAST)
    out = tmp_path / "export"
    fails([g, "--out", out, "--base-model", tmp_path / "no-such-model"], "cannot load base model")
    assert not out.exists()
    # A checkpoint whose recipe names a base model that is not on this machine.
    moved = tmp_path / "moved"
    shutil.copytree(g, moved)
    data = json.loads((moved / storage.GLOBAL_MANIFEST).read_text())
    data["recipe"]["model"]["base"] = str(tmp_path / "gone")
    (moved / storage.GLOBAL_MANIFEST).write_text(json.dumps(data))
    fails([moved, "--out", out, "--merge"], "cannot load base model", "gone")
    assert not out.exists()
    no_leftovers(tmp_path, "export")


def test_other_bad_input(ffa_run, tmp_path):
    g = ffa_run.global_checkpoint(LAST)
    out = tmp_path / "export"
    fails([tmp_path / "nope", "--out", out], "global checkpoint not found")
    fails([g, "--out", out, "--merge", "--dtype", "int8"], "--dtype", "float16")
    fails([g, "--out", out, "--eval-data", tmp_path / "no.parquet"], "dataset not found")
    (tmp_path / "file").write_text("x")
    fails([g, "--out", tmp_path / "file"], "not a folder")
    assert not out.exists()


def test_failure_while_writing_leaves_nothing(ffa_run, tmp_path, monkeypatch):
    def half_write(bench, folder, dtype, base_ref):
        (folder / "adapter_model.safetensors").write_bytes(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(exporter, "_write_adapter", half_write)
    out = tmp_path / "export"
    fails([ffa_run.global_checkpoint(LAST), "--out", out], "disk full")
    assert not out.exists()
    no_leftovers(tmp_path, "export")


def test_a_mean_pooled_export_loads_with_the_pooling_it_was_trained_with(federation_of, tmp_path, reviews_csv):
    import sys

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fedlora_cli.model import pooling

    g = federation_of("ffa", model={"pooling": "mean"}).global_checkpoint(LAST)
    ok([g, "--out", tmp_path / "merged", "--merge"])
    ok([g, "--out", tmp_path / "adapter"])
    expected = fedlora_logits(g)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")

    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged", trust_remote_code=True)
    assert type(merged).__name__ == "MeanPooledBertForSequenceClassification"
    torch.testing.assert_close(logits(merged, tokenizer), expected, atol=1e-4, rtol=0)
    # Without its custom code the stock class gets a random pooler (the weights have none): not the model.
    stock = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    assert not torch.allclose(logits(stock, tokenizer), expected, atol=1e-3)

    # The adapter carries the same file; the card's usage installs it on the base before PEFT loads the adapter.
    assert (tmp_path / "adapter" / pooling.REMOTE_CODE_FILE).read_text() == (
        tmp_path / "merged" / pooling.REMOTE_CODE_FILE).read_text()
    _, body, table = card_of(tmp_path / "adapter")
    assert 'install(base, "mean")' in body and "masked mean" in table["classifier head"]
    assert "trust_remote_code=True" in card_of(tmp_path / "merged")[1]
    sys.path.insert(0, str(tmp_path / "adapter"))
    try:
        from fedlora_pooling import install
    finally:
        sys.path.pop(0)
        sys.modules.pop("fedlora_pooling", None)
    from peft import PeftModel

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    base = AutoModelForSequenceClassification.from_pretrained(config["base_model_name_or_path"], num_labels=2)
    install(base, "mean")
    adapter = PeftModel.from_pretrained(base, tmp_path / "adapter")
    torch.testing.assert_close(logits(adapter, tokenizer), expected, atol=1e-5, rtol=0)

    # As a recipe's base, the export needs its pooling again: its weights have no pooler to read.
    from conftest import recipe_dict

    from fedlora_cli.errors import FedloraError
    from fedlora_cli.model.workbench import build

    raw = recipe_dict(tmp_path / "merged", reviews_csv, "ffa")
    raw["model"]["pooling"] = "default"
    with pytest.raises(FedloraError, match=r"mean-pooled fedlora export .* set model\.pooling 'mean' or 'auto'"):
        build(recipes.from_dict(raw), num_labels=2)
    for choice in ("mean", "auto"):  # auto reads the pooling from the export's config.auto_map
        raw["model"]["pooling"] = choice
        rebuilt = build(recipes.from_dict(raw), num_labels=2)
        assert rebuilt.pooling == "mean"
        torch.testing.assert_close(logits(rebuilt.model, tokenizer), expected, atol=1e-4, rtol=0)
