"""The model card (README.md) of an export: Hub metadata and how the federation trained the model."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from fedlora_cli import federation
from fedlora_cli.adapters import HEAD_POLICIES, METHODS, adapter_kind
from fedlora_cli.adapters.roles import ROLE_HEAD, ROLE_LABELS
from fedlora_cli.recipe.loading import resolve_location
from fedlora_cli.recipe.schema import TASK_CAUSAL_LM
from fedlora_cli.storage.manifests import GlobalManifest
from fedlora_cli.text import fmt

MODEL_CARD = "README.md"


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


_DATA_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".parquet", ".txt", ".bz2", ".gz", ".arrow")


def hub_id_of(base: str) -> str | None:
    """The recipe's base model as a Hub id, or None for a local folder or ``pkg:`` path."""
    if base.startswith(("pkg:", "/", ".", "~")) or ".." in base or Path(base).expanduser().exists():
        return None
    return base if _HUB_ID.match(base) else None


def base_reference(recipe_base: str, loaded_from: str) -> str:
    """``base_model_name_or_path`` of the export: the recipe's Hub id, else the folder the base was loaded from."""
    hub_id = hub_id_of(recipe_base)
    if hub_id is not None:
        return hub_id
    path = Path(resolve_location(loaded_from)).expanduser()
    return str(path.resolve()) if path.exists() else loaded_from


def base_license(location: str, revision: str | None = None) -> str | None:
    """The ``license`` of the base model's own model card, from its folder or the local Hub cache (no network)."""
    readme: Path | None = None
    path = Path(location).expanduser()
    if path.is_dir():
        readme = path / MODEL_CARD
    elif hub_id_of(location) is not None:
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(location, MODEL_CARD, revision=revision)
        except Exception:  # a malformed id or cache: the license is simply unknown
            cached = None
        readme = Path(cached) if isinstance(cached, str) else None
    if readme is None or not readme.is_file():
        return None
    meta = _front_matter(readme.read_text(errors="replace"))
    value = meta.get("license")
    return str(value) if isinstance(value, (str, int)) and str(value).strip() else None


def _front_matter(text: str) -> dict[str, Any]:
    import yaml

    if not text.startswith("---"):
        return {}
    parts = text.split("\n---", 1)
    if len(parts) < 2:
        return {}
    try:
        data = yaml.safe_load(parts[0][3:])
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def _title(manifest: GlobalManifest, client_id: str | None) -> str:
    who = f", personalised for {client_id}" if client_id else ""
    return f"{METHODS[manifest.method].label} round {manifest.round}{who}"


def _dataset_id(source: str | None) -> str | None:
    if not source or source.lower().endswith(_DATA_SUFFIXES):
        return None
    return hub_id_of(source)


def _notes(manifest: GlobalManifest, client_id: str | None) -> list[str]:
    kept = federation.plan_of(manifest).local
    if client_id is not None or not kept:
        return []
    what = " and ".join(sorted("the classifier head" if r == ROLE_HEAD else ROLE_LABELS[r] for r in kept))
    return [
        f"{METHODS[manifest.method].label} clients keep {what} at home: in the global model "
        f"{'they are' if len(kept) > 1 else 'it is'} still at the round-0 initialisation. "
        "Export with --state CLIENT_STATE for a client's personalised model."
    ]


def model_card(
    manifest: GlobalManifest,
    kind: str = "adapter",
    client_id: str | None = None,
    base_model: str | None = None,
    hub_base_model: str | None = None,
    license_id: str | None = None,
    evaluation: list[dict[str, Any]] | None = None,
    privacy_facts: dict[str, Any] | None = None,
    dtype: str = "float32",
    global_dir: Path | None = None,
) -> str:
    """README.md with Hub metadata (YAML front matter) describing how the federation trained this model."""
    import yaml

    recipe = manifest.recipe
    model, data, adapter = recipe["model"], recipe["data"], recipe["adapter"]
    fed, training = recipe["federation"], recipe["training"]
    base_model = base_model or model["base"]
    method = manifest.method
    method_name = METHODS[method].label
    evaluation = evaluation or []
    privacy_facts = privacy_facts or {}

    causal = model.get("task") == TASK_CAUSAL_LM
    pipeline_tag = "text-generation" if causal else "text-classification"
    tags = ["fedlora", "federated-learning", "lora", f"{method_name.lower()}", pipeline_tag]
    if kind == "merged":
        tags.append("merged-lora")
    if privacy_facts:
        tags.append("differential-privacy")
    if client_id:
        tags.append("personalized")
    meta: dict[str, Any] = {}
    if hub_base_model:
        meta["base_model"] = hub_base_model
    meta["library_name"] = "peft" if kind == "adapter" else "transformers"
    meta["pipeline_tag"] = pipeline_tag
    if license_id:
        meta["license"] = license_id
    dataset = _dataset_id(data.get("source"))
    if dataset:
        meta["datasets"] = [dataset]
    meta["tags"] = tags

    labels = [str(x) for x in manifest.label_names or [f"LABEL_{i}" for i in range(manifest.num_labels or 0)]]
    lines = ["---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).strip(), "---", ""]
    lines.append(f"# {recipe.get('name', 'federation')}: {_title(manifest, client_id)}")
    lines.append("")
    what = "A LoRA adapter for" if kind == "adapter" else (
        "A causal language model fine-tuned from" if causal else "A sequence classifier fine-tuned from"
    )
    lines.append(
        f"{what} `{base_model}`, trained with federated learning by fedlora: "
        f"{fed['clients']} clients each trained on their own data, which never left them; only adapter tensors "
        "travelled to the coordinator."
        + (f" The LoRA update is merged into the base weights (saved in {dtype})." if kind == "merged" else "")
    )
    if client_id:
        lines.append("")
        lines.append(
            f"This is client **{client_id}**'s personalised model: the global adapter of round {manifest.round} "
            "plus the tensors this client kept at home."
        )
    elif federation.plan_of(manifest).local:
        lines.append("")
        lines.append("> " + _notes(manifest, None)[0])
    aggregated = f" (last round aggregated: {', '.join(manifest.clients)})" if manifest.clients else ""
    lines += ["", "## Federated training", "", "| | |", "|---|---|"]
    rows = [
        ("method", f"{method} ({method_name}): {METHODS[method].explanation}"),
        ("classifier head", f"{manifest.head}: {HEAD_POLICIES[manifest.head]}") if not causal else
        ("task", "causal-lm: the loss is on the response tokens only; the LM head is part of the frozen base model"),
        ("rounds", f"{manifest.round} (of {fed['rounds']} planned)"),
        ("clients", f"{fed['clients']}" + aggregated),
        ("client weighting", str(fed.get("weighting", "-"))),
        ("partition", _partition_text(data)),
        ("labels", ", ".join(f"{i}: {name}" for i, name in enumerate(labels))) if not causal else
        ("data", f"prompt column '{data.get('prompt_column')}', response column '{data.get('response_column')}'"
                 + (", chat template" if data.get("chat_template") else "") + f", max length {data.get('max_length')}"),
        ("adapter", adapter_kind(manifest.adapter_kind).describe(adapter)),
        ("local training", _training_text(training)),
        ("base model", f"`{base_model}`"),
        ("recipe digest", f"`{manifest.recipe_digest[:16]}`"),
        ("checkpoint digest", f"`{manifest.digest[:16]}`" + (f" ({global_dir.name})" if global_dir is not None else "")),
    ]
    lines += [f"| {k} | {v} |" for k, v in rows]

    if privacy_facts:
        lines += ["", "## Differential privacy", ""]
        dp = privacy_facts.get("dp_sgd")
        if dp:
            budget = f", budget ε = {dp['target_epsilon']:g} per client" if dp.get("target_epsilon") is not None else ""
            lines.append(
                "Sample-level DP-SGD at every client: per-example gradients clipped to norm "
                f"{fmt(dp.get('max_grad_norm'), 3)}, "
                f"Gaussian noise multiplier {fmt(dp.get('noise_multiplier'), 4)}, δ = {dp.get('delta'):g}, "
                f"{dp.get('accountant')} accountant{budget}."
            )
            spent = dp.get("spent") or {}
            if spent:
                lines.append("")
                lines.append("Privacy spent up to this round (each client's own ledger):")
                lines.append("")
                lines += [f"- {cid}: ε = {eps:.3f} (δ = {dp.get('delta'):g})" for cid, eps in spent.items()]
            else:
                lines.append("")
                lines.append(
                    "No client ledger was found beside this checkpoint; each client's spending is in its state folder "
                    "(`fedlora privacy report STATE`)."
                )
        server = privacy_facts.get("dp_fedavg")
        if server:
            lines.append("")
            target = f" (budget {server['target_epsilon']:g})" if server.get("target_epsilon") is not None else ""
            lines.append(
                f"Client-level DP-FedAvg at the coordinator, {server['releases']} release(s) of an aggregate: "
                f"ε = {server['epsilon']:.3f} "
                f"at δ = {server['delta']:g}{target}."
            )

    lines += ["", "## Evaluation", ""]
    if evaluation and causal:
        cap = next((r.get("max_new_tokens") for r in evaluation if r.get("max_new_tokens")), None)
        lines += ["| model | data | examples | loss per response token | perplexity | exact match |", "|---|---|---|---|---|---|"]
        lines += [
            f"| {r['model']} | {r['data']} | {fmt(r['examples'])} | {fmt(r['loss'])} | {fmt(r.get('perplexity'), 2)} "
            f"| {fmt(r.get('exact_match'))} |"
            for r in evaluation
        ]
        if cap:
            lines += ["", f"Exact match: greedy generation of at most {cap} new tokens, final number compared."]
    elif evaluation:
        lines += ["| model | data | examples | accuracy | macro-F1 | loss |", "|---|---|---|---|---|---|"]
        lines += [
            f"| {r['model']} | {r['data']} | {fmt(r['examples'])} | {fmt(r['accuracy'])} | {fmt(r['macro_f1'])} "
            f"| {fmt(r['loss'])} |"
            for r in evaluation
        ]
    else:
        lines.append("Not evaluated at export (pass `--eval-data` to `fedlora export`).")

    lines += ["", "## Usage", "", "```python"]
    if causal:
        if kind == "adapter":
            lines += [
                "from peft import PeftModel",
                "from transformers import AutoModelForCausalLM, AutoTokenizer",
                "",
                f'base = AutoModelForCausalLM.from_pretrained("{base_model}")',
                'model = PeftModel.from_pretrained(base, "PATH_OR_REPO_OF_THIS_FOLDER").eval()',
            ]
        else:
            lines += [
                "from transformers import AutoModelForCausalLM, AutoTokenizer",
                "",
                'model = AutoModelForCausalLM.from_pretrained("PATH_OR_REPO_OF_THIS_FOLDER").eval()',
            ]
        lines.append('tokenizer = AutoTokenizer.from_pretrained("PATH_OR_REPO_OF_THIS_FOLDER")')
        if data.get("chat_template"):
            lines += [
                'text = tokenizer.apply_chat_template([{"role": "user", "content": "A question"}],',
                "                                     add_generation_prompt=True, tokenize=False)",
                'inputs = tokenizer(text, add_special_tokens=False, return_tensors="pt")',
            ]
        else:
            lines.append('inputs = tokenizer("A prompt", return_tensors="pt")')
        lines += [
            "output = model.generate(**inputs, max_new_tokens=128, do_sample=False)",
            'print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
            "```",
        ]
    elif kind == "adapter":
        lines += [
            "from peft import PeftModel",
            "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
            "",
            f'base = AutoModelForSequenceClassification.from_pretrained("{base_model}", num_labels={manifest.num_labels})',
            'model = PeftModel.from_pretrained(base, "PATH_OR_REPO_OF_THIS_FOLDER").eval()',
            'tokenizer = AutoTokenizer.from_pretrained("PATH_OR_REPO_OF_THIS_FOLDER")',
        ]
    else:
        lines += [
            "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
            "",
            'model = AutoModelForSequenceClassification.from_pretrained("PATH_OR_REPO_OF_THIS_FOLDER").eval()',
            'tokenizer = AutoTokenizer.from_pretrained("PATH_OR_REPO_OF_THIS_FOLDER")',
        ]
    if not causal:
        lines += [
            'logits = model(**tokenizer(["some text"], return_tensors="pt")).logits',
            f"labels = {labels!r}",
            "```",
        ]
    if kind == "adapter" and hub_id_of(base_model) is None:
        lines += [
            "",
            f"`{base_model}` is where the base model was on the machine that exported this adapter; "
            "replace it with your copy of the same base model.",
        ]
    return "\n".join(lines) + "\n"


def _partition_text(data: dict[str, Any]) -> str:
    text = f"{data['strategy']}"
    if data["strategy"] == "dirichlet":
        text += f", alpha {fmt(data['alpha'], 3)}"
    if data["strategy"] in ("natural", "dirichlet") and data.get("by"):
        text += f", by column '{data['by']}'"
    if data["strategy"] == "size":
        sizes = data.get("sizes")
        text += f", sizes {', '.join(fmt(v, 3) for v in sizes)}" if sizes else f", Dirichlet({fmt(data['alpha'], 3)}) sizes"
    return text + f", seed {data['seed']}, test fraction {fmt(data['test_fraction'], 3)}"


def _training_text(t: dict[str, Any]) -> str:
    amount = f"{t['local_steps']} steps" if t.get("local_steps") is not None else f"{t['local_epochs']:g} epochs"
    return f"{t['optimizer']}, lr {t['lr']:g}, {amount} of batch {t['batch_size']} per round, seed {t['seed']}"


def _model_label(client_id: str | None) -> str:
    return f"personalised for {client_id}" if client_id else "global"
