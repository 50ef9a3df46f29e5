"""The causal-lm task on a tiny random Llama: response-only loss, truncation, the answer extractor,
deterministic evaluation, every method / adapter kind / DP, a federated round through the CLI, and export
round trips that plain transformers and PEFT load and generate the same tokens from."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import yaml
from conftest import causal_recipe_dict, make_math
from typer.testing import CliRunner

from fedlora_cli import export as exports, federation, recipe as recipes, storage
from fedlora_cli.adapters.methods import plan
from fedlora_cli.adapters.roles import role_of
from fedlora_cli.cli import app
from fedlora_cli.data import partition
from fedlora_cli.data.examples import (
    IGNORE_INDEX,
    PromptResponses,
    encode,
    fit,
    prompt_ids,
    read_examples,
    response_ids,
)
from fedlora_cli.errors import FedloraError
from fedlora_cli.model import evaluation
from fedlora_cli.model.training import batch_loss
from fedlora_cli.model.workbench import build

runner = CliRunner()

PAIRS = PromptResponses(
    prompts=["Sam has 3 apples and the rule is add 4. How many apples?", "What is 12 * 2?"],
    responses=["3 + 4 = 7\n#### 7", "12 * 2 = 24\n#### 24"],
    answers=["7", "24"],
    chat_template=True,
)


def ok(args: list) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.stdout


def fails(args: list, needle: str) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and needle in " ".join(result.output.split()), result.output
    return result.output


# --------------------------------------------------------------------------------------------------------
# encoding and the loss


def test_labels_cover_the_response_and_eos_only(make_causal_recipe):
    bench = build(make_causal_recipe(), None)
    tok = bench.tokenizer
    batch = encode(tok, PAIRS, [0, 1], 64)
    for k in range(2):
        p = prompt_ids(tok, PAIRS.prompts[k], True)
        r = response_ids(tok, PAIRS.responses[k])
        n = len(p) + len(r)
        assert r[-1] == tok.eos_token_id
        assert batch["input_ids"][k, :n].tolist() == p + r
        assert (batch["labels"][k, : len(p)] == IGNORE_INDEX).all(), "prompt tokens carry no loss"
        assert batch["labels"][k, len(p) : n].tolist() == r
        assert (batch["labels"][k, n:] == IGNORE_INDEX).all() and (batch["attention_mask"][k, n:] == 0).all()
    # The chat template wraps the prompt as a user turn and opens the assistant's.
    text = tok.decode(prompt_ids(tok, PAIRS.prompts[0], True))
    assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_start|>assistant\n")


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


def test_truncation_keeps_the_end_of_the_prompt_and_the_start_of_the_response():
    assert fit([1, 2, 3], [7, 8, 9], 5) == ([1, 2, 3], [7, 8])
    assert fit([1, 2, 3, 4, 5, 6], [7, 8], 4) == ([4, 5, 6], [7])
    assert fit([1], [7, 8], 64) == ([1], [7, 8])


# --------------------------------------------------------------------------------------------------------
# the answer extractor


@pytest.mark.parametrize(
    "text, expected",
    [
        ("#### 42", "42"),
        ("Janet has 3 + 4 = 7 eggs.\n#### 7", "7"),
        ("12 + 30 = 42\n#### 42\nThanks for asking! 9", "42"),
        ("The answer is 42.", "42"),
        ("So the answer is: 42 apples, not 7.", "42"),
        ("Answer: -17", "-17"),
        ("It costs $1,234 in total.", "1234"),
        ("He pays $1,234.50.", "1234.5"),
        ("The temperature drops to -3.5 degrees.", "-3.5"),
        ("Therefore the result is \\boxed{42}.", "42"),
        ("\\boxed{1,000} and then 5", "1000"),
        ("First 3 apples, then 5 more, so 8 in all", "8"),
        ("x = 3.0", "3"),
        ("42.00", "42"),
        ("No number here.", None),
        ("", None),
    ],
)
def test_extract_number(text, expected):
    assert evaluation.extract_number(text) == expected


def test_extractor_matches_the_gsm_solutions_the_dataset_command_writes():
    frame = make_math(20, seed=5)
    for response, answer in zip(frame["response"], frame["answer"]):
        assert evaluation.extract_number(response) == evaluation.canonical_number(answer)


# --------------------------------------------------------------------------------------------------------
# evaluation


def test_evaluation_is_deterministic_and_reports_causal_metrics(make_causal_recipe, math_jsonl, tmp_path):
    r = make_causal_recipe()
    out = tmp_path / "data"
    partition.partition(r.data, 3, out, task="causal-lm")
    test = read_examples(out / partition.TEST_SHARD, r.data, "causal-lm", None)
    bench = build(r, None)
    first = evaluation.evaluate(bench, test)
    second = evaluation.evaluate(build(r, None), test)
    assert first == second
    assert first["examples"] == len(test) and first["generated"] == 10 and first["scored"] == 10
    assert first["perplexity"] == pytest.approx(np.exp(first["loss"]))
    assert 0 <= first["exact_match"] <= 1 and first["response_tokens"] > 0
    a = evaluation.generate(bench, test, np.arange(6), 8)
    b = evaluation.generate(bench, test, np.arange(6), 8)
    assert [g.tokens for g in a] == [g.tokens for g in b]
    assert all(len(g.tokens) <= 8 for g in a)


def test_exact_match_counts_generations_whose_final_number_is_the_gold_answer(make_causal_recipe, monkeypatch):
    bench = build(make_causal_recipe(), None)
    canned = {"7": "3 + 4 = 7 so #### 7", "24": "The answer is 25."}

    def fake_generate(bench, examples, rows, max_new_tokens, progress=None):
        return [evaluation.Generation([], canned[examples.answers[i]], False) for i in rows]

    monkeypatch.setattr(evaluation, "generate", fake_generate)
    metrics = evaluation.evaluate(bench, PAIRS)
    assert metrics["exact_match"] == 0.5 and metrics["scored"] == 2


def test_answer_none_skips_generation(make_causal_recipe):
    bench = build(make_causal_recipe(sections={"evaluation": {"answer": "none"}}), None)
    metrics = evaluation.evaluate(bench, PAIRS)
    assert metrics["exact_match"] is None and metrics["generated"] == 0 and metrics["loss"] > 0


# --------------------------------------------------------------------------------------------------------
# methods, adapter kinds, DP


@pytest.mark.parametrize(
    "method, sections",
    [
        ("fedavg", {}),
        ("ffa", {}),
        ("fedsa", {}),
        ("fedsa", {"adapter": {"kind": "rslora"}}),
        ("ffa", {"adapter": {"kind": "vera", "r": 16}}),
        ("fedavg", {"federation": {"aggregation": "svd"}}),
        ("ffa", {"privacy": {"noise_multiplier": 0.5, "max_grad_norm": 1.0, "delta": 1e-3}, "training": {"optimizer": "sgd", "lr": 0.5}}),
    ],
)
def test_every_method_kind_and_dp_trains_a_causal_lm(method, sections, make_causal_recipe, run_federation):
    r = make_causal_recipe(method, sections={"federation": {"rounds": 1}, **sections})
    layout = run_federation(r)
    g0 = storage.read_global(layout.global_checkpoint(0)).tensors()
    g1 = storage.read_global(layout.global_checkpoint(1)).tensors()
    p = plan(method, "frozen", r.adapter.kind)
    assert not [n for n in g0 if role_of(n) == "head"], "a causal LM adapter has no head tensors"
    moved = [n for n in g0 if not torch.equal(g0[n], g1[n])]
    assert moved and all(p.sends(n) for n in moved)
    frozen = [n for n in g0 if role_of(n) in p.frozen]
    assert all(torch.equal(g0[n], g1[n]) for n in frozen)
    metrics = json.loads((layout.metrics(1)).read_text())
    assert metrics["global"]["task"] == "causal-lm" and metrics["global"]["loss"] > 0
    if r.privacy is not None:
        assert storage.read_update(layout.update(1, "client-0")).manifest.privacy["epsilon"] > 0


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


# --------------------------------------------------------------------------------------------------------
# partitioning without labels


def test_partitions_without_labels(make_causal_recipe, tmp_path):
    r = make_causal_recipe()
    data = r.data
    plain = dataclasses.replace(data, strategy="iid", by=None)
    iid = partition.partition(plain, 3, tmp_path / "iid", task="causal-lm")
    assert iid.manifest["task"] == "causal-lm" and iid.manifest["label_names"] == [] and iid.manifest["label_column"] is None
    assert sum(c["examples"] for c in iid.manifest["clients"]) == 120
    # With a category column, any strategy counts its values per client, as labels are counted.
    counted = partition.partition(dataclasses.replace(data, strategy="iid"), 3, tmp_path / "iid2", task="causal-lm")
    assert counted.manifest["label_names"] == ["add", "mul", "sub"] and counted.manifest["label_column"] == "category"
    natural = partition.partition(dataclasses.replace(data, strategy="natural"), 3, tmp_path / "nat", task="causal-lm")
    assert [c["value"] for c in natural.manifest["clients"]] == ["add", "mul", "sub"]
    assert all(sum(1 for n in c["label_counts"] if n) == 1 for c in natural.manifest["clients"])
    sized = partition.partition(dataclasses.replace(data, strategy="size", sizes=[0.6, 0.3, 0.1]), 3,
                                tmp_path / "size", task="causal-lm")
    assert [c["examples"] for c in sized.manifest["clients"]] == [72, 36, 12]
    drawn = partition.partition(dataclasses.replace(data, strategy="size", alpha=1.0), 3, tmp_path / "drawn",
                                task="causal-lm")
    assert len({c["examples"] for c in drawn.manifest["clients"]}) > 1
    shard = read_examples(tmp_path / "size" / "client-2.parquet", data, "causal-lm", None)
    assert len(shard) == 12 and shard.answers is not None and shard.chat_template


def test_by_size_honours_proportions_and_refuses_an_empty_client():
    rng = np.random.default_rng(0)
    parts = partition.by_size(10, 3, rng, [0.5, 0.25, 0.25])
    assert [len(p) for p in parts] == [5, 3, 2] or [len(p) for p in parts] == [5, 2, 3]
    assert sorted(np.concatenate(parts).tolist()) == list(range(10))
    with pytest.raises(FedloraError, match="without an example"):
        partition.by_size(10, 3, rng, [0.98, 0.01, 0.01])


# --------------------------------------------------------------------------------------------------------
# recipes


@pytest.mark.parametrize(
    "patch, key",
    [
        ({"federation": {"head": "shared"}}, "federation.head"),
        ({"model": {"num_labels": 3}}, "model.num_labels"),
        ({"data": {"labels": ["a", "b"]}}, "data.labels"),
        ({"data": {"by": None}}, "data.by"),
        ({"evaluation": {"answer": "regex"}}, "evaluation.answer"),
        ({"evaluation": {"max_new_tokens": 0}}, "evaluation.max_new_tokens"),
        ({"data": {"strategy": "size", "sizes": [1, 2]}}, "data.sizes"),
        ({"data": {"response_column": "question"}}, "data.response_column"),
    ],
)
def test_causal_recipe_errors_name_the_key(patch, key, tiny_causal_dir, math_jsonl):
    raw = causal_recipe_dict(tiny_causal_dir, math_jsonl)
    for section, values in patch.items():
        raw[section] = {**raw[section], **values}
    with pytest.raises(FedloraError, match=f"'{key}'"):
        recipes.from_dict(raw)


def test_causal_defaults_target_attention_projections_and_freeze_the_head():
    r = recipes.from_dict({"model": {"base": "m", "task": "causal-lm"}})
    assert r.adapter.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"] and r.federation.head == "frozen"
    classic = recipes.from_dict({"model": {"base": "m"}})
    assert classic.adapter.target_modules == ["query", "value"] and classic.federation.head == "shared"


# --------------------------------------------------------------------------------------------------------
# one federated round through the CLI


@pytest.mark.parametrize("method", ["ffa", "fedsa"])
def test_a_causal_federation_round_by_hand(method, tmp_path, tiny_causal_dir, math_jsonl):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(causal_recipe_dict(tiny_causal_dir, math_jsonl, method)))
    data = tmp_path / "data"
    table = ok(["partition", "--recipe", recipe, "--out", data])
    assert "client-2" in table and "add" in table
    ok(["init", recipe, "--data", data, "--out", tmp_path / "g0"])
    updates = []
    for k in range(3):
        update = tmp_path / f"u{k}"
        info = json.loads(ok(["train-client", tmp_path / "g0", "--data", data / f"client-{k}.parquet",
                              "--state", tmp_path / f"client-{k}", "--out", update, "--json"]))
        assert info["round"] == 1 and info["loss"] > 0
        updates.append(update)
    ok(["aggregate", tmp_path / "g0", *updates, "--out", tmp_path / "g1"])
    g = json.loads(ok(["evaluate", tmp_path / "g1", "--data", data, "--json"]))
    assert g["task"] == "causal-lm" and g["round"] == 1 and g["generated"] == 10
    assert {"loss", "perplexity", "exact_match", "hit_cap"} <= set(g)
    table = ok(["evaluate", tmp_path / "g1", "--data", data, "--state", tmp_path / "client-0",
                "--max-new-tokens", "4", "--generate-examples", "3"])
    assert "exact" in table and "(3)" in table  # 3 generations scored
    fails(["evaluate", tmp_path / "g1", "--data", data, "--answer", "regex"], "evaluation.answer")


def test_partition_cli_for_unlabelled_data(tmp_path, math_jsonl):
    out = json.loads(ok(["partition", math_jsonl, "--task", "causal-lm", "--prompt-column", "question",
                         "--strategy", "size", "--sizes", "0.5,0.3,0.2", "--out", tmp_path / "p", "--json"]))
    assert [c["examples"] for c in out["clients"]] == [60, 36, 24]
    table = ok(["partition", math_jsonl, "--task", "causal-lm", "--prompt-column", "question",
                "--strategy", "dirichlet", "--by", "category", "-n", "2", "--out", tmp_path / "d"])
    assert "mul" in table
    fails(["partition", math_jsonl, "--task", "causal-lm", "--prompt-column", "question", "--strategy", "dirichlet",
           "--out", tmp_path / "x"], "data.by")
    fails(["partition", math_jsonl, "--task", "causal-lm", "--out", tmp_path / "y"], "column 'prompt' not in the dataset")


def test_init_refuses_a_partition_of_the_other_task(tmp_path, make_causal_recipe, partition_dir):
    with pytest.raises(FedloraError, match="model.task"):
        federation.init(make_causal_recipe(), tmp_path / "g0", partition=partition.read_manifest(partition_dir))


# --------------------------------------------------------------------------------------------------------
# export round trips


@pytest.fixture(scope="module")
def fedsa_run(tmp_path_factory, tiny_causal_dir, math_jsonl):
    from conftest import QuietReporter

    from fedlora_cli.federation import simulate

    raw = causal_recipe_dict(tiny_causal_dir, math_jsonl, "fedsa", lr=0.05)
    raw["training"]["eval_batch_size"] = 1  # one prompt per generate call, as the plain loop below does
    layout = simulate.RunLayout(tmp_path_factory.mktemp("causal-export") / "run")
    simulate.simulate(recipes.from_dict(raw), layout.root, QuietReporter())
    return layout


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
# preparation commands


def test_datasets_gsm_symbolic_writes_deterministic_jsonl(tmp_path):
    pytest.importorskip("reasoning_gym")
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    ok(["datasets", "gsm-symbolic", "--size", "5", "--seed", "3", "-o", a])
    ok(["datasets", "gsm-symbolic", "--size", "5", "--seed", "3", "-o", b])
    assert a.read_text() == b.read_text()
    rows = [json.loads(line) for line in a.read_text().splitlines()]
    assert len(rows) == 5 and {"question", "response", "answer", "template", "id"} <= set(rows[0])
    for row in rows:
        assert evaluation.extract_number(row["response"]) == evaluation.canonical_number(row["answer"])
    fails(["datasets", "gsm-symbolic", "--size", "5", "-o", a], "already exists")
    fails(["datasets", "gsm-symbolic", "--size", "5", "-o", tmp_path / "c.csv"], "*.jsonl")
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_convert_gguf_refuses_bad_sources_in_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    fails(["convert-gguf", tmp_path / "missing.gguf", "-o", tmp_path / "out"], "GGUF file not found")
    fails(["convert-gguf", tmp_path / "empty", "-o", tmp_path / "out"], "expected one .gguf file")
    (tmp_path / "model.bin").write_bytes(b"x")
    fails(["convert-gguf", tmp_path / "model.bin", "-o", tmp_path / "out"], "is not a .gguf file")
    assert not (tmp_path / "out").exists()
