"""fedlora_cli.cli.federation: init, train-client, aggregate and evaluate: a federation by hand (sequence
classification and causal-lm), and every mistake a user can make with them: one clear error line, exit code 1,
no traceback, nothing half-written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import causal_recipe_dict, recipe_dict
from safetensors.torch import load_file, save_file

from cli.helpers import fails, ok, refused, runner, write_recipe
from fedlora_cli import storage
from fedlora_cli.cli import app


def metrics_by_hand(global_dir: Path, data: Path, state: Path | None = None) -> tuple[float, float]:
    """Accuracy and macro-F1 on the partition's test split of the global (or a client's personalised) model: the
    argmax of its logits against the labels, and per class F1 = 2 tp / (2 tp + fp + fn), averaged over the
    classes that occur."""
    import pandas as pd

    from fedlora_cli import federation

    bench, _ = federation.load_for_evaluation(global_dir, state)
    test = pd.read_parquet(data / "test.parquet")
    batch = bench.tokenizer(test["text"].tolist(), padding=True, truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        predicted = bench.model(**batch).logits.argmax(dim=-1).tolist()
    labels = test["sentiment"].tolist()
    f1 = []
    for c in (0, 1):
        tp = sum(1 for y, q in zip(labels, predicted) if y == c and q == c)
        fp = sum(1 for y, q in zip(labels, predicted) if y != c and q == c)
        fn = sum(1 for y, q in zip(labels, predicted) if y == c and q != c)
        if tp + fp + fn:
            f1.append(2 * tp / (2 * tp + fp + fn))
    return sum(y == q for y, q in zip(labels, predicted)) / len(labels), sum(f1) / len(f1)


def test_a_federation_by_hand(tmp_path, tiny_model_dir, reviews_csv):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(recipe_dict(tiny_model_dir, reviews_csv, method="fedsa")))
    data = tmp_path / "data"
    out = ok(["partition", reviews_csv, "--label-column", "sentiment", "--labels", "neg,pos", "-n", "3",
              "--strategy", "dirichlet", "--alpha", "0.5", "--out", data, "--plot", tmp_path / "labels.png"])
    assert "client-2" in out and (tmp_path / "labels.png").is_file()
    ok(["init", recipe, "--data", data, "--out", tmp_path / "g0"])
    for round_ in (1, 2):
        updates = []
        for k in range(3):
            update = tmp_path / f"u{round_}-{k}"
            info = json.loads(ok(["train-client", tmp_path / f"g{round_ - 1}", "--data", data / f"client-{k}.parquet",
                                  "--state", tmp_path / f"client-{k}", "--out", update, "--json"]))
            assert info["round"] == round_ and info["client_id"] == f"client-{k}"
            updates.append(update)
        agg = json.loads(ok(["aggregate", tmp_path / f"g{round_ - 1}", *updates, "--out", tmp_path / f"g{round_}", "--json"]))
        assert agg["round"] == round_ and sum(c["weight"] for c in agg["clients"]) == pytest.approx(1.0)
    g = json.loads(ok(["evaluate", tmp_path / "g2", "--data", data, "--json"]))
    p = json.loads(ok(["evaluate", tmp_path / "g2", "--data", data, "--state", tmp_path / "client-1", "--json"]))
    assert g["round"] == 2 and not g["personalised"] and p["personalised"]
    # The numbers evaluate printed are the global model's accuracy and client-1's personalised macro-F1 on the test
    # split, as computed here from the models' logits.
    accuracy, _ = metrics_by_hand(tmp_path / "g2", data)
    _, macro_f1 = metrics_by_hand(tmp_path / "g2", data, tmp_path / "client-1")
    assert g["accuracy"] == pytest.approx(accuracy) and p["macro_f1"] == pytest.approx(macro_f1)
    table = ok(["aggregate", tmp_path / "g1", *[tmp_path / f"u2-{k}" for k in range(3)], "--out", tmp_path / "again"])
    assert "update" in table and "norm" in table and "shard" in table  # 3 steps of 8: part of each shard
    shown = ok(["inspect", tmp_path / "g2"])
    digest = storage.read_global(tmp_path / "g2").manifest.digest
    assert "global checkpoint" in shown and f"{digest[:16]}…" in shown and digest not in shown  # fits 80 columns
    assert "pooling" in shown and "default (no modules.json" in shown  # the tiny model has no sentence-transformers files


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
    row = next(line for line in table.splitlines() if "│ test" in line)
    assert "personalised" in table and "exact" in table and row.split("│")[6].strip() == "3"  # 3 generations scored
    assert "│ validation" in table  # the partition's validation split, scored beside its test split
    refused(["evaluate", tmp_path / "g1", "--data", data, "--answer", "regex"], "--answer must be one of none, number")
    refused(["evaluate", tmp_path / "g1", "--data", data, "--max-new-tokens", "0"], "--max-new-tokens must be at least 1")


def test_a_federation_over_multi_turn_messages_by_hand_is_the_simulated_one(tmp_path, tiny_causal_dir):
    from conftest import write_chats

    raw = causal_recipe_dict(tiny_causal_dir, write_chats(tmp_path / "chats.jsonl"), "fedsa")
    for key in ("prompt_column", "response_column", "chat_template"):
        raw["data"].pop(key)  # the messages column is found (data.format auto) and always templated
    raw["federation"]["rounds"] = 1
    raw["evaluation"]["generate_examples"] = 2
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    ok(["simulate", recipe, "--out", tmp_path / "run"])
    data = tmp_path / "data"
    assert "messages rows" in ok(["partition", "--recipe", recipe, "--out", data])
    ok(["init", recipe, "--data", data, "--out", tmp_path / "g0"])
    updates = []
    for k in range(3):
        updates.append(tmp_path / f"u{k}")
        ok(["train-client", tmp_path / "g0", "--data", data / f"client-{k}.parquet", "--state", tmp_path / f"client-{k}",
            "--out", updates[-1]])
    ok(["aggregate", tmp_path / "g0", *updates, "--out", tmp_path / "g1"])
    by_hand = storage.read_global(tmp_path / "g1").tensors()
    simulated = storage.read_global(storage.RunLayout(tmp_path / "run").global_checkpoint(1)).tensors()
    assert set(by_hand) == set(simulated) and all(torch.equal(by_hand[n], simulated[n]) for n in by_hand)
    g = json.loads(ok(["evaluate", tmp_path / "g1", "--data", data, "--json"]))
    logged = json.loads(storage.RunLayout(tmp_path / "run").metrics(1).read_text())["global"]
    assert g["generated"] == 2 and g["loss"] == pytest.approx(logged["loss"]) and g["response_tokens"] > 0


# --------------------------------------------------------------------------------------------------------
# Bad input


@pytest.fixture
def run(make_recipe, cached_federation):
    """A finished 2-round FFA federation to corrupt copies of."""
    return cached_federation(make_recipe("ffa"))


def copy_update(layout, tmp_path: Path, client: str = "client-0", round_: int = 1) -> Path:
    dst = tmp_path / f"bad-{client}-{round_}"
    shutil.copytree(layout.update(round_, client), dst)
    return dst


def edit_manifest(update: Path, **changes) -> None:
    path = update / storage.UPDATE_MANIFEST
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def aggregate_fails(layout, tmp_path, updates, *needles):
    out = tmp_path / "next"
    fails(["aggregate", layout.global_checkpoint(0), *updates, "--out", out], *needles)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".next")], "temporary folder left behind"


def good_updates(layout, skip: str | None = None) -> list[Path]:
    return [layout.update(1, c) for c in ("client-0", "client-1", "client-2") if c != skip]


def test_missing_global_checkpoint(tmp_path, partition_dir):
    out = tmp_path / "u"
    fails(["train-client", tmp_path / "nowhere", "--data", partition_dir / "client-0.parquet",
           "--state", tmp_path / "s", "--out", out], "global checkpoint not found")
    assert not out.exists()


def test_missing_shard(run, tmp_path):
    out = tmp_path / "u"
    fails(["train-client", run.global_checkpoint(2), "--data", tmp_path / "no.parquet",
           "--state", tmp_path / "s", "--out", out], "dataset not found")
    assert not out.exists()


def test_update_from_another_round(run, tmp_path):
    aggregate_fails(run, tmp_path, [*good_updates(run, "client-2"), run.update(2, "client-2")], "round 2")


def test_update_from_another_base_model(run, tmp_path):
    bad = copy_update(run, tmp_path)
    edit_manifest(bad, base_fingerprint="0123456789abcdef")
    aggregate_fails(run, tmp_path, [bad, *good_updates(run, "client-0")], "different base model")


def test_update_from_another_global(run, tmp_path):
    bad = copy_update(run, tmp_path)
    edit_manifest(bad, parent_digest="f" * 64)
    aggregate_fails(run, tmp_path, [bad, *good_updates(run, "client-0")], "parent digest")


def test_ffa_client_with_a_different_a(run, tmp_path):
    bad = copy_update(run, tmp_path)
    edit_manifest(bad, frozen_digest="e" * 64)
    aggregate_fails(run, tmp_path, [bad, *good_updates(run, "client-0")], "frozen A")


def test_mismatched_shapes(run, tmp_path):
    bad = copy_update(run, tmp_path)
    tensors = load_file(str(bad / storage.UPDATE_TENSORS))
    name = sorted(tensors)[0]
    tensors[name] = torch.zeros(tensors[name].shape[0], tensors[name].shape[1] + 1)
    save_file(tensors, str(bad / storage.UPDATE_TENSORS))
    aggregate_fails(run, tmp_path, [bad, *good_updates(run, "client-0")], name)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_update(run, tmp_path, value):
    bad = copy_update(run, tmp_path)
    tensors = load_file(str(bad / storage.UPDATE_TENSORS))
    name = sorted(tensors)[-1]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = value
    save_file(tensors, str(bad / storage.UPDATE_TENSORS))
    # With a matching digest: what a faulty client, which writes its own manifest, would send.
    digests = json.loads((bad / storage.UPDATE_MANIFEST).read_text())["tensor_digests"]
    edit_manifest(bad, tensor_digests={**digests, name: storage.tensor_digest(tensors[name])})
    aggregate_fails(run, tmp_path, [*good_updates(run, "client-0"), bad], "NaN or Inf", name)


@pytest.mark.parametrize("value, needle", [
    (float("nan"), "field 'num_examples'"), ("120", "field 'num_examples'"), (True, "field 'num_examples'"),
    (0, "must be positive"), (10**9, "at most shard_examples"),
])
def test_update_manifest_with_a_bad_example_count(run, tmp_path, value, needle):
    # A count from another site is data: a NaN would make every weight NaN, a string would crash the sum.
    bad = copy_update(run, tmp_path)
    edit_manifest(bad, num_examples=value)
    aggregate_fails(run, tmp_path, [bad, *good_updates(run, "client-0")], needle)


def test_tampered_update_fails_its_digest(run, tmp_path):
    bad = copy_update(run, tmp_path)
    tensors = load_file(str(bad / storage.UPDATE_TENSORS))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1.0
    save_file(tensors, str(bad / storage.UPDATE_TENSORS))
    aggregate_fails(run, tmp_path, [bad, *good_updates(run, "client-0")], f"tensor '{name}' does not match the digest")


def test_a_flipped_bit_in_an_update_fails_its_digest(run, tmp_path):
    bad = copy_update(run, tmp_path)
    data = bytearray((bad / storage.UPDATE_TENSORS).read_bytes())
    data[-3] ^= 0x10  # in the data of the tensor stored last: the file still parses
    (bad / storage.UPDATE_TENSORS).write_bytes(bytes(data))
    aggregate_fails(run, tmp_path, [*good_updates(run, "client-0"), bad], str(bad), "does not match the digest")


def test_an_update_digest_of_unknown_algorithm_is_refused(run, tmp_path):
    bad = copy_update(run, tmp_path)
    digests = json.loads((bad / storage.UPDATE_MANIFEST).read_text())["tensor_digests"]
    name = min(digests)
    edit_manifest(bad, tensor_digests={**digests, name: "blake9:" + "0" * 64})
    aggregate_fails(run, tmp_path, [*good_updates(run, "client-0"), bad], f"tensor '{name}'",
                    "unknown algorithm 'blake9'", "newer fedlora")


def test_truncated_safetensors(run, tmp_path):
    bad = copy_update(run, tmp_path)
    data = (bad / storage.UPDATE_TENSORS).read_bytes()
    (bad / storage.UPDATE_TENSORS).write_bytes(data[: len(data) // 2])
    aggregate_fails(run, tmp_path, [bad, *good_updates(run, "client-0")], "safetensors")


def test_same_client_twice(run, tmp_path):
    dup = copy_update(run, tmp_path)
    aggregate_fails(run, tmp_path, [*good_updates(run), dup], "client-0", "twice")


def test_update_with_a_tensor_the_method_does_not_send(run, tmp_path):
    bad = copy_update(run, tmp_path)
    tensors = load_file(str(bad / storage.UPDATE_TENSORS))
    a_name = next(n for n in load_file(str(run.global_checkpoint(0) / storage.ADAPTER_WEIGHTS)) if "lora_A" in n)
    tensors[a_name] = torch.zeros(4, 32)
    save_file(tensors, str(bad / storage.UPDATE_TENSORS))
    aggregate_fails(run, tmp_path, [bad, *good_updates(run, "client-0")], "does not send")


def test_pickle_file_is_never_loaded(run, tmp_path):
    """A client that sends a torch.save pickle instead of safetensors is refused, not unpickled."""
    bad = copy_update(run, tmp_path)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    import pickle

    (bad / storage.UPDATE_TENSORS).write_bytes(pickle.dumps(Evil()))
    aggregate_fails(run, tmp_path, [bad, *good_updates(run, "client-0")], "safetensors")
    assert not marker.exists()


def test_existing_output_is_not_overwritten(run, tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    fails(["aggregate", run.global_checkpoint(0), *good_updates(run), "--out", out], "already exists")
    assert (out / "keep.txt").read_text() == "mine"


def test_client_state_of_another_client(run, tmp_path):
    out = tmp_path / "u"
    fails(["train-client", run.global_checkpoint(2), "--data", run.data / "client-0.parquet",
           "--state", run.state("client-1"), "--client-id", "client-0", "--out", out], "belongs to client")
    assert not out.exists()


def test_base_model_that_cannot_be_found(run, tmp_path):
    out = tmp_path / "u"
    fails(["train-client", run.global_checkpoint(2), "--data", run.data / "client-0.parquet",
           "--state", tmp_path / "client-0", "--out", out, "--base-model", tmp_path / "no-model"],
          "cannot load base model")
    assert not out.exists()


def test_embedding_targets_are_refused_by_name(tmp_path, tiny_model_dir, reviews_csv, partition_dir):
    raw = recipe_dict(tiny_model_dir, reviews_csv)
    raw["adapter"]["target_modules"] = ["query", "word_embeddings"]
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    fails(["init", path, "--data", partition_dir, "--out", tmp_path / "g"], "'word_embeddings' is an embedding layer")
    assert not (tmp_path / "g").exists()


def test_strategy_override_that_does_not_fit_the_method(run, tmp_path):
    # run is an FFA-LoRA federation: only B travels, so there is no product B A to combine.
    out = tmp_path / "next"
    fails(["aggregate", run.global_checkpoint(0), *good_updates(run), "--out", out, "--strategy", "svd"],
          "'svd'", "fedavg", "ffa")
    assert not out.exists()


def test_trimmed_mean_that_trims_nothing(run, tmp_path):
    out = tmp_path / "next"
    fails(["aggregate", run.global_checkpoint(0), *good_updates(run), "--out", out, "--strategy", "trimmed-mean"],
          "trims no client")
    assert not out.exists()
    fails(["aggregate", run.global_checkpoint(0), *good_updates(run), "--out", out, "--strategy", "mean",
           "--norm-bound", "-1"], "norm bound")
    assert not out.exists()


def test_every_update_rejected_by_the_norm_bound(run, tmp_path):
    out = tmp_path / "next"
    fails(["aggregate", run.global_checkpoint(0), *good_updates(run), "--out", out, "--norm-bound", "1e-9",
           "--norm-bound-action", "reject"], "all 3 client updates exceed the norm bound", "nothing written")
    assert not out.exists()


@pytest.fixture
def vera_global(tmp_path, tiny_model_dir, reviews_csv, partition_dir) -> Path:
    path = write_recipe(tmp_path, tiny_model_dir, reviews_csv, "fedsa", adapter={"kind": "vera", "r": 16})
    out = tmp_path / "g0"
    assert runner.invoke(app, ["init", str(path), "--data", str(partition_dir), "--out", str(out)]).exit_code == 0
    return out


def test_vera_projections_that_differ_on_a_site_are_refused(vera_global, tmp_path, partition_dir, monkeypatch):
    """A site whose random generator derives other projections from the same seed must not train."""
    import peft.tuners.vera.model as vera_model

    real = vera_model._kaiming_init
    monkeypatch.setattr(vera_model, "_kaiming_init", lambda shape, generator: real(shape, generator) * (1 + 1e-6))
    out, state = tmp_path / "u", tmp_path / "state"
    fails(["train-client", vera_global, "--data", partition_dir / "client-0.parquet", "--state", state,
           "--client-id", "client-0", "--out", out], "VeRA projection", "differs from the global checkpoint")
    assert not out.exists() and not state.exists()
    monkeypatch.setattr(vera_model, "_kaiming_init", real)
    result = runner.invoke(app, ["train-client", str(vera_global), "--data", str(partition_dir / "client-0.parquet"),
                                 "--state", str(state), "--client-id", "client-0", "--out", str(out)])
    assert result.exit_code == 0, result.output


def test_vera_update_trained_with_other_projections_is_refused(vera_global, tmp_path, partition_dir):
    updates = []
    for k in range(2):
        update = tmp_path / f"u{k}"
        result = runner.invoke(app, ["train-client", str(vera_global), "--data", str(partition_dir / f"client-{k}.parquet"),
                                     "--state", str(tmp_path / f"s{k}"), "--client-id", f"client-{k}", "--out", str(update)])
        assert result.exit_code == 0, result.output
        updates.append(update)
    edit_manifest(updates[0], frozen_digest="d" * 64)
    out = tmp_path / "g1"
    fails(["aggregate", vera_global, *updates, "--out", out], "different frozen VeRA projections")
    assert not out.exists()


# Site settings on the command line --------------------------------------------------------------------------------


def test_train_client_and_evaluate_run_the_way_this_site_asks_and_say_so(tmp_path, tiny_model_dir, reviews_csv,
                                                                         partition_dir):
    ok(["init", write_recipe(tmp_path, tiny_model_dir, reviews_csv), "--data", partition_dir, "--out", tmp_path / "g0"])
    out = ok(["train-client", tmp_path / "g0", "--data", partition_dir / "client-0.parquet", "--state",
              tmp_path / "state", "--client-id", "client-0", "--out", tmp_path / "u", "--dtype", "bfloat16",
              "--accumulation-steps", "2"])
    assert "ran on: cpu · base bfloat16 · 2 micro-batches" in " ".join(out.split())
    assert storage.read_update(tmp_path / "u").manifest.site["dtype"] == "bfloat16"
    out = ok(["evaluate", tmp_path / "g0", "--data", partition_dir, "--quantization", "8bit"])
    assert "ran on: cpu · base 8bit" in " ".join(out.split())
    other = torch.get_num_threads() + 1  # a site's count, not this process's: the by-hand path reproduces its bits
    metrics = json.loads(ok(["evaluate", tmp_path / "g0", "--data", partition_dir, "--threads", other, "--json"]))
    assert metrics["site"]["threads"] == other


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        (["--device", "tpu"], "--device must be one of auto, cpu, cuda, mps or 'cuda:N'; got 'tpu'"),
        (["--quantization", "3bit"], "--quantization must be one of none, 4bit, 8bit; got '3bit'"),
        (["--accumulation-steps", "0"], "--accumulation-steps must be at least 1"),
        *([] if torch.cuda.is_available() else [(["--device", "cuda"], "this machine has no CUDA device")]),
    ],
)
def test_a_site_option_this_site_cannot_use_is_one_line_and_writes_nothing(tmp_path, tiny_model_dir, reviews_csv,
                                                                           partition_dir, options, needle):
    ok(["init", write_recipe(tmp_path, tiny_model_dir, reviews_csv), "--data", partition_dir, "--out", tmp_path / "g0"])
    fails(["train-client", tmp_path / "g0", "--data", partition_dir / "client-0.parquet", "--state", tmp_path / "state",
           "--client-id", "client-0", "--out", tmp_path / "u", *options], needle)
    assert not (tmp_path / "u").exists() and not (tmp_path / "state").exists()


# --------------------------------------------------------------------------------------------------------
# A site's own data: train-client and evaluate take any source partition reads


def own_copy(shard: Path, path: Path, names: list[str] | None) -> Path:
    """A partition shard as a site would keep it: in another format, with an extra column, its labels as names
    (``names``) or as ids."""
    import datasets
    import pandas as pd

    frame = pd.read_parquet(shard)
    frame = frame.assign(site="here")[["site", "sentiment", "text"]]
    if names is not None:
        frame["sentiment"] = [names[i] for i in frame["sentiment"]]
    if path.name.endswith((".csv", ".csv.gz")):
        frame.to_csv(path, index=False)
    elif path.suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True)
    elif path.suffix == ".parquet":
        frame.to_parquet(path)
    else:
        datasets.DatasetDict({"mine": datasets.Dataset.from_pandas(frame)}).save_to_disk(str(path))
    return path


def test_a_site_trains_on_its_own_file_as_on_its_shard(run, tmp_path):
    """The same rows as a CSV (.gz) or JSONL with label names, a Parquet of ids or a save_to_disk folder (--split)
    train exactly as the shard does: same examples, same loss, same update."""
    shard = run.data / "client-0.parquet"
    names = json.loads((run.data / "partition.json").read_text())["label_names"]

    def train(name: str, data: Path, *extra) -> tuple[dict, dict]:
        update = tmp_path / f"update-{name}"
        info = json.loads(ok(["train-client", run.global_checkpoint(1), "--data", data, *extra,
                              "--state", tmp_path / name / "client-0", "--out", update, "--json"]))
        return info, load_file(update / storage.UPDATE_TENSORS)

    expected, expected_tensors = train("shard", shard)
    owns = {
        "csv": (own_copy(shard, tmp_path / "own.csv", names), []),
        "gz": (own_copy(shard, tmp_path / "own.csv.gz", names), []),
        "jsonl": (own_copy(shard, tmp_path / "own.jsonl", names), []),
        "ids": (own_copy(shard, tmp_path / "own.parquet", None), []),
        "saved": (own_copy(shard, tmp_path / "own-saved", names), ["--split", "mine"]),
    }
    for name, (data, extra) in owns.items():
        info, tensors = train(name, data, *extra)
        assert (info["num_examples"], info["steps"], info["loss"]) == (
            expected["num_examples"], expected["steps"], expected["loss"]), name
        assert tensors.keys() == expected_tensors.keys()
        for key, tensor in tensors.items():
            torch.testing.assert_close(tensor, expected_tensors[key], rtol=0, atol=0, msg=f"{name}: {key}")


def test_evaluate_on_a_csv_gives_the_test_shards_metrics(run, tmp_path):
    names = json.loads((run.data / "partition.json").read_text())["label_names"]
    own = own_copy(run.data / "test.parquet", tmp_path / "test.csv", names)
    on_shard = json.loads(ok(["evaluate", run.global_checkpoint(2), "--data", run.data, "--json"]))
    on_csv = json.loads(ok(["evaluate", run.global_checkpoint(2), "--data", own, "--json"]))
    on_shard.pop("validation")  # a partition folder's validation split is scored too; a file is test data only
    assert on_csv == on_shard and on_csv["examples"] == 80


def test_a_global_without_label_names_numbers_names_by_the_recipe_or_takes_ids(run, tmp_path):
    """A global checkpoint that records no label names (init without a partition folder) falls back to the recipe's
    data.labels; without those either, a file of names is refused and ids still work."""
    names = json.loads((run.data / "partition.json").read_text())["label_names"]
    own = own_copy(run.data / "test.parquet", tmp_path / "test.csv", names)
    g = tmp_path / "g"
    shutil.copytree(run.global_checkpoint(2), g)
    path = g / storage.GLOBAL_MANIFEST
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps({**manifest, "label_names": None}))
    expected = json.loads(ok(["evaluate", run.global_checkpoint(2), "--data", run.data, "--json"]))
    expected.pop("validation")  # scored from a partition folder only
    assert json.loads(ok(["evaluate", g, "--data", own, "--json"])) == expected
    manifest["recipe"]["data"]["labels"] = None
    path.write_text(json.dumps({**manifest, "label_names": None}))
    fails(["evaluate", g, "--data", own], "holds label names ('", "give label ids 0..1")
    assert json.loads(ok(["evaluate", g, "--data", run.data, "--json"]))["accuracy"] == expected["accuracy"]


BAD_DATA = {
    "unknown label": ("own.csv", "text,sentiment\ngood film,pos\ndull plot,meh\n",
                      ["own.csv: column 'sentiment': label 'meh' is not one the federation knows", "labels: neg, pos"]),
    "missing column": ("own.csv", "text,label\ngood film,pos\n", ["own.csv has no column 'sentiment'"]),
    "empty file": ("own.csv", "", ["own.csv is empty"]),
    "no rows": ("own.jsonl", "\n", ["own.jsonl is empty"]),
    "header only": ("own.csv", "text,sentiment\n", ["own.csv is empty"]),
    "unreadable file": ("own.parquet", "this is no parquet file", ["cannot read", "own.parquet"]),
    "id out of range": ("own.csv", "text,sentiment\ngood film,1\ndull plot,2\n",
                        ["label id 2 is out of range", "0..1"]),
}


@pytest.mark.parametrize("command", ["train-client", "evaluate"])
@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_own_data_is_refused_in_one_line_and_writes_nothing(run, tmp_path, command, case):
    name, text, needles = BAD_DATA[case]
    (tmp_path / name).write_text(text)
    args = ["--state", tmp_path / "client-0", "--out", tmp_path / "update"] if command == "train-client" else []
    fails([command, run.global_checkpoint(1), "--data", tmp_path / name, *args], *needles)
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_a_site_trains_a_causal_lm_on_its_own_jsonl(make_causal_recipe, cached_federation, tmp_path):
    import pandas as pd

    layout = cached_federation(make_causal_recipe("ffa", sections={"federation": {"rounds": 1}}))
    shard = layout.data / "client-0.parquet"
    own = tmp_path / "own.jsonl"
    pd.read_parquet(shard).assign(site="here").to_json(own, orient="records", lines=True)
    losses = []
    for name, data in (("shard", shard), ("own", own)):
        info = json.loads(ok(["train-client", layout.global_checkpoint(0), "--data", data,
                              "--state", tmp_path / name / "client-0", "--out", tmp_path / f"update-{name}", "--json"]))
        losses.append(info["loss"])
    assert losses[0] == losses[1]
    (tmp_path / "no-answer.jsonl").write_text('{"question": "What is 2 + 2?", "response": "#### 4"}\n')
    fails(["evaluate", layout.global_checkpoint(1), "--data", tmp_path / "no-answer.jsonl"],
          "no-answer.jsonl has no column 'answer'")


@pytest.mark.parametrize("command", ["train-client", "evaluate"])
def test_the_help_of_data_says_what_it_takes(command):
    text = " ".join(ok([command, "--help"]).replace("│", " ").split())
    for needle in ("its shard" if command == "train-client" else "a partition folder", "CSV, TSV, JSON, JSONL or Parquet file",
                   "save_to_disk folder", "Hub dataset", "the recipe's columns", "label names", "--split"):
        assert needle in text, needle


@pytest.mark.parametrize("key, text, needle", [
    ("server_tau", "1e30", "'federation.server_tau' must lie between 1e-18 and 1e+18"),
    ("server_tau", "1.0e+200", "'federation.server_tau' must lie between"),
    ("server_lr", ".inf", "'federation.server_lr' must be a finite number"),
    ("server_lr", "1.0e+300", "'federation.server_lr' must be > 0 and at most 3.4e+38"),
])
def test_init_refuses_a_server_optimiser_number_its_arithmetic_cannot_take(tmp_path, tiny_model_dir, reviews_csv,
                                                                           partition_dir, key, text, needle):
    """Issue 28: these passed init, and aggregate then failed after the clients trained (an internal overflow
    error, or blaming the client updates)."""
    path = write_recipe(tmp_path, tiny_model_dir, reviews_csv, federation={"server_optimizer": "fedadam"})
    path.write_text(path.read_text().replace("federation:\n", f"federation:\n  {key}: {text}\n", 1))
    out = tmp_path / "g0"
    fails(["init", path, "--data", partition_dir, "--out", out], needle)
    assert not out.exists()
