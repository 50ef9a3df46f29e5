"""The model card (README.md) of an export: Hub metadata and how the federation trained the model."""

from __future__ import annotations

import re
from functools import lru_cache
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

from fedlora_cli import federation
from fedlora_cli.adapters import HEAD_POLICIES, METHODS, adapter_kind
from fedlora_cli.adapters.roles import ROLE_HEAD, ROLE_LABELS
from fedlora_cli.recipe.loading import resolve_location
from fedlora_cli.recipe.schema import TASK_CAUSAL_LM
from fedlora_cli.storage.manifests import GlobalManifest
from fedlora_cli.text import fmt

MODEL_CARD = "README.md"


# The card's layout; model_card() computes what goes into each ${placeholder}.
_TEMPLATE_FILE = "model_card.md"


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
    recipe = manifest.recipe
    base_model = base_model or recipe["model"]["base"]
    causal = recipe["model"].get("task") == TASK_CAUSAL_LM
    rows = _training_rows(manifest, base_model, causal, global_dir)
    return _template().substitute(
        front_matter=_metadata(manifest, kind, client_id, hub_base_model, license_id, bool(privacy_facts), causal),
        name=recipe.get("name", "federation"),
        title=_title(manifest, client_id),
        intro=_intro(manifest, kind, base_model, dtype, causal),
        aside=_block(_aside(manifest, client_id)),
        training_rows="\n".join(f"| {k} | {v} |" for k, v in rows),
        privacy_section=_block(_privacy_section(privacy_facts or {})),
        evaluation="\n".join(_evaluation_lines(evaluation or [], causal)),
        usage="\n".join(_usage_lines(manifest, kind, base_model, causal)),
        base_note=_block(_base_note(kind, base_model)),
    )


@lru_cache(maxsize=1)
def _template() -> Template:
    text = resources.files("fedlora_cli.export").joinpath(_TEMPLATE_FILE).read_text(encoding="utf-8")
    # The file ends in a newline like any text file; in the card, the line break after the last block is the end.
    return Template(text.removesuffix("\n"))


def _block(lines: list[str]) -> str:
    """An optional block for a placeholder that sits on its own line of the template: nothing, or a blank line and
    the block's lines, so that the template's line break after it is the blank line before what follows."""
    return "\n" + "\n".join(lines) + "\n" if lines else ""


def _labels(manifest: GlobalManifest) -> list[str]:
    return [str(x) for x in manifest.label_names or [f"LABEL_{i}" for i in range(manifest.num_labels or 0)]]


def _metadata(
    manifest: GlobalManifest, kind: str, client_id: str | None, hub_base_model: str | None, license_id: str | None,
    differential_privacy: bool, causal: bool,
) -> str:
    """The YAML front matter the Hub reads (its base_model only for a Hub id: the Hub rejects anything else)."""
    import yaml

    pipeline_tag = "text-generation" if causal else "text-classification"
    tags = ["fedlora", "federated-learning", "lora", f"{METHODS[manifest.method].label.lower()}", pipeline_tag]
    if kind == "merged":
        tags.append("merged-lora")
    if differential_privacy:
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
    dataset = _dataset_id(manifest.recipe["data"].get("source"))
    if dataset:
        meta["datasets"] = [dataset]
    meta["tags"] = tags
    return yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).strip()


def _intro(manifest: GlobalManifest, kind: str, base_model: str, dtype: str, causal: bool) -> str:
    what = "A LoRA adapter for" if kind == "adapter" else (
        "A causal language model fine-tuned from" if causal else "A sequence classifier fine-tuned from"
    )
    return (
        f"{what} `{base_model}`, trained with federated learning by fedlora: "
        f"{manifest.recipe['federation']['clients']} clients each trained on their own data, which never left them; "
        "only adapter tensors travelled to the coordinator."
        + (f" The LoRA update is merged into the base weights (saved in {dtype})." if kind == "merged" else "")
    )


def _aside(manifest: GlobalManifest, client_id: str | None) -> list[str]:
    """Whose model this is: a client's personalised one, or a global one still missing what clients keep."""
    if client_id:
        return [(
            f"This is client **{client_id}**'s personalised model: the global adapter of round {manifest.round} "
            "plus the tensors this client kept at home."
        )]
    return ["> " + note for note in _notes(manifest, None)]


def _training_rows(
    manifest: GlobalManifest, base_model: str, causal: bool, global_dir: Path | None
) -> list[tuple[str, str]]:
    recipe = manifest.recipe
    data, fed = recipe["data"], recipe["federation"]
    method = METHODS[manifest.method]
    aggregated = f" (last round aggregated: {', '.join(manifest.clients)})" if manifest.clients else ""
    task = ("task", "causal-lm: the loss is on the response tokens only; the LM head is part of the frozen base model")
    read = "the masked mean of the last hidden states" if _mean_pooled(manifest) else "the architecture's own pooling"
    head = ("classifier head", f"{manifest.head}: {HEAD_POLICIES[manifest.head]}; it reads {read}")
    inputs = ("data", f"prompt column '{data.get('prompt_column')}', response column '{data.get('response_column')}'"
              + (", chat template" if data.get("chat_template") else "") + f", max length {data.get('max_length')}")
    labels = ("labels", ", ".join(f"{i}: {name}" for i, name in enumerate(_labels(manifest))))
    where = f" ({global_dir.name})" if global_dir is not None else ""
    return [
        ("method", f"{manifest.method} ({method.label}): {method.explanation}"),
        task if causal else head,
        ("rounds", f"{manifest.round} (of {fed['rounds']} planned)"),
        ("clients", f"{fed['clients']}" + aggregated),
        ("client weighting", str(fed.get("weighting", "-"))),
        ("partition", _partition_text(data)),
        inputs if causal else labels,
        ("adapter", adapter_kind(manifest.adapter_kind).describe(recipe["adapter"])),
        ("local training", _training_text(recipe["training"])),
        ("base model", f"`{base_model}`"),
        ("recipe digest", f"`{manifest.recipe_digest[:16]}`"),
        ("checkpoint digest", f"`{manifest.digest[:16]}`" + where),
    ]


# The neighbouring relation the guarantees hold under (README "Privacy" says the same).
NEIGHBOURS = (
    "The guarantees are for *zero-out* neighbours: one example (DP-SGD) or one client's update (DP-FedAvg) "
    "replaced by one that contributes nothing. Each client update publishes its shard size and each global "
    "checkpoint names the clients it averaged, so the add-or-remove relation is not what they protect; swapping "
    "one example for an arbitrary other is covered at twice the epsilon and a delta of (1 + e^epsilon) delta "
    "(group privacy over two zero-outs)."
)


def _privacy_section(facts: dict[str, Any]) -> list[str]:
    """Sample-level DP-SGD at the clients and client-level DP-FedAvg at the coordinator, as far as they ran."""
    if not facts:
        return []
    lines = ["## Differential privacy", ""]
    dp = facts.get("dp_sgd")
    if dp:
        lines += _dp_sgd_lines(dp)
    server = facts.get("dp_fedavg")
    if server:
        target = f" (budget {server['target_epsilon']:g})" if server.get("target_epsilon") is not None else ""
        lines += [
            "",
            (f"Client-level DP-FedAvg at the coordinator, {server['releases']} release(s) of an aggregate: "
             f"ε = {server['epsilon']:.3f} at δ = {server['delta']:g}{target}"
             f"{', ' + server['accountant'] + ' accountant' if server.get('accountant') else ''}."),
        ]
    return lines + ["", NEIGHBOURS]


def _dp_sgd_lines(dp: dict[str, Any]) -> list[str]:
    budget = f", budget ε = {dp['target_epsilon']:g} per client" if dp.get("target_epsilon") is not None else ""
    lines = [(
        "Sample-level DP-SGD at every client: per-example gradients clipped to norm "
        f"{fmt(dp.get('max_grad_norm'), 3)}, "
        f"Gaussian noise multiplier {fmt(dp.get('noise_multiplier'), 4)}, δ = {dp.get('delta'):g}, "
        f"{dp.get('accountant')} accountant{budget}."
    )]
    spent = dp.get("spent") or {}
    if not spent:
        return lines + [
            "",
            ("No client ledger was found beside this checkpoint; each client's spending is in its state folder "
             "(`fedlora privacy report STATE`)."),
        ]
    return lines + ["", "Privacy spent up to this round (each client's own ledger):", ""] + [
        f"- {cid}: ε = {eps:.3f} (δ = {dp.get('delta'):g})" for cid, eps in spent.items()
    ]


def _evaluation_lines(evaluation: list[dict[str, Any]], causal: bool) -> list[str]:
    if not evaluation:
        return ["Not evaluated at export (pass `--eval-data` to `fedlora export`)."]
    if not causal:
        return ["| model | data | examples | accuracy | macro-F1 | loss |", "|---|---|---|---|---|---|"] + [
            f"| {r['model']} | {r['data']} | {fmt(r['examples'])} | {fmt(r['accuracy'])} | {fmt(r['macro_f1'])} "
            f"| {fmt(r['loss'])} |"
            for r in evaluation
        ]
    lines = [
        "| model | data | examples | loss per response token | perplexity | exact match |", "|---|---|---|---|---|---|"
    ] + [
        f"| {r['model']} | {r['data']} | {fmt(r['examples'])} | {fmt(r['loss'])} | {fmt(r.get('perplexity'), 2)} "
        f"| {fmt(r.get('exact_match'))} |"
        for r in evaluation
    ]
    cap = next((r.get("max_new_tokens") for r in evaluation if r.get("max_new_tokens")), None)
    if cap:
        lines += ["", f"Exact match: greedy generation of at most {cap} new tokens, final number compared."]
    return lines


def _usage_lines(manifest: GlobalManifest, kind: str, base_model: str, causal: bool) -> list[str]:
    """The Python snippet that loads this export, without its closing fence."""
    if causal:
        return _causal_usage(kind, base_model, bool(manifest.recipe["data"].get("chat_template")))
    mean = _mean_pooled(manifest)
    if kind == "adapter":
        lines = [
            "from peft import PeftModel",
            "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
            "",
            f'base = AutoModelForSequenceClassification.from_pretrained("{base_model}", num_labels={manifest.num_labels})',
        ]
        if mean:
            lines[0:0] = ["import sys", ""]
            lines[-1:-1] = ['sys.path.insert(0, "LOCAL_COPY_OF_THIS_FOLDER")  # fedlora_pooling.py ships in it',
                            "from fedlora_pooling import install", ""]
            lines.append("install(base)  # the head reads the masked mean of the last hidden states, as trained")
        lines.append('model = PeftModel.from_pretrained(base, "PATH_OR_REPO_OF_THIS_FOLDER").eval()')
    else:
        remote = ", trust_remote_code=True" if mean else ""  # fedlora_pooling.py: the masked mean the head reads
        lines = [
            "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
            "",
            f'model = AutoModelForSequenceClassification.from_pretrained("PATH_OR_REPO_OF_THIS_FOLDER"{remote}).eval()',
        ]
    return lines + [
        'tokenizer = AutoTokenizer.from_pretrained("PATH_OR_REPO_OF_THIS_FOLDER")',
        'logits = model(**tokenizer(["some text"], return_tensors="pt")).logits',
        f"labels = {_labels(manifest)!r}",
    ]


def _mean_pooled(manifest: GlobalManifest) -> bool:
    """Whether the head reads the masked mean (``model.pooling``; checkpoints from before it read the default)."""
    return manifest.recipe["model"].get("pooling", "default") == "mean"


def _causal_usage(kind: str, base_model: str, chat_template: bool) -> list[str]:
    if kind == "adapter":
        lines = [
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'base = AutoModelForCausalLM.from_pretrained("{base_model}")',
            'model = PeftModel.from_pretrained(base, "PATH_OR_REPO_OF_THIS_FOLDER").eval()',
        ]
    else:
        lines = [
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            'model = AutoModelForCausalLM.from_pretrained("PATH_OR_REPO_OF_THIS_FOLDER").eval()',
        ]
    lines.append('tokenizer = AutoTokenizer.from_pretrained("PATH_OR_REPO_OF_THIS_FOLDER")')
    if chat_template:
        lines += [
            'text = tokenizer.apply_chat_template([{"role": "user", "content": "A question"}],',
            "                                     add_generation_prompt=True, tokenize=False)",
            'inputs = tokenizer(text, add_special_tokens=False, return_tensors="pt")',
        ]
    else:
        lines.append('inputs = tokenizer("A prompt", return_tensors="pt")')
    return lines + [
        "output = model.generate(**inputs, max_new_tokens=128, do_sample=False)",
        'print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
    ]


def _base_note(kind: str, base_model: str) -> list[str]:
    if kind != "adapter" or hub_id_of(base_model) is not None:
        return []
    return [(
        f"`{base_model}` is where the base model was on the machine that exported this adapter; "
        "replace it with your copy of the same base model."
    )]


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
