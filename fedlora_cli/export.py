"""Exporting a federation's model for use outside fedlora, with a model card, optionally pushed to the Hub.

Two kinds of folder, both written atomically (a temporary sibling renamed into place)::

    adapter (default)   adapter_config.json + adapter_model.safetensors + tokenizer + README.md. Vanilla PEFT
                        loads it, classifier head (modules_to_save) included:
                        PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(
                            base, num_labels=N), folder)
    merged (merge=True) the LoRA update folded into the base weights (W + scale * B A, computed in float32),
                        saved as a plain transformers model (config.json + model.safetensors + tokenizer +
                        README.md) that AutoModelForSequenceClassification.from_pretrained(folder) loads with
                        no PEFT. config.id2label / label2id carry the partition's label names.

Either holds the global model, or the model personalised for one client (``state_dir``): the global adapter
plus the tensors that client kept at home (FedSA-LoRA's B, a local head), the model ``fedlora evaluate
--state`` scores.

Where the adapter says its base model is (``base_model_name_or_path``): a recipe whose ``model.base`` is a
Hub id keeps that id, which works on any machine (the Hub and the model card's ``base_model`` know it).
A local or ``pkg:`` base is written as the folder the export actually loaded (``--base-model`` if given,
else the recipe's path with ``pkg:`` resolved), so that ``AutoPeftModelForSequenceClassification`` works on
the exporting machine; anyone else passes their own copy of the base, as the model card's snippet shows.
The card's ``base_model`` metadata is written only for a Hub id: the Hub rejects anything else there.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedlora_cli import checkpoint, federation, privacy
from fedlora_cli.checkpoint import GlobalManifest
from fedlora_cli.errors import FedloraError
from fedlora_cli.methods import ROLE_HEAD, ROLE_LABELS
from fedlora_cli.recipe import TASK_CAUSAL_LM, resolve_location

if TYPE_CHECKING:
    from fedlora_cli.modeling import Workbench

DTYPES = ("float32", "float16", "bfloat16")
MODEL_CARD = "README.md"

METHOD_NAMES = {"fedavg": "FedAvg-LoRA", "ffa": "FFA-LoRA", "fedsa": "FedSA-LoRA"}
METHOD_EXPLANATIONS = {
    "fedavg": "every client trains both LoRA matrices A and B; the coordinator averages A and B (FedIT, the baseline).",
    "ffa": "A stays frozen at its seeded random initialisation; clients train and send only B, which the coordinator "
           "averages (Sun et al., ICLR 2024, arXiv 2403.12313).",
    "fedsa": "clients train A and B but share only A, which the coordinator averages; each client keeps its own B "
             "(Guo et al., ICLR 2025, arXiv 2410.01463).",
}
HEAD_EXPLANATIONS = {
    "shared": "trained by every client and averaged",
    "local": "trained by each client and kept at home",
    "frozen": "left at its seeded initialisation",
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_DATA_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".parquet", ".txt", ".bz2", ".gz", ".arrow")


@dataclass
class HubTarget:
    """Where and how ``--push-to-hub`` uploads the exported folder."""

    repo_id: str
    private: bool = False
    revision: str | None = None
    commit_message: str | None = None
    token: str | None = None


@dataclass
class ExportResult:
    path: Path
    kind: str  # "adapter" or "merged"
    dtype: str
    round: int
    method: str
    head: str
    client_id: str | None
    base_model: str  # base_model_name_or_path of the adapter, or the base the merged model was folded into
    files: list[tuple[str, int]]
    evaluation: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)
    hub_url: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path), "kind": self.kind, "dtype": self.dtype, "round": self.round,
            "method": self.method, "head": self.head, "client_id": self.client_id, "base_model": self.base_model,
            "files": [{"name": name, "bytes": size} for name, size in self.files],
            "evaluation": self.evaluation, "notes": self.notes, "hub_url": self.hub_url,
        }


# --------------------------------------------------------------------------------------------------------
# export


def export(
    global_dir: Path,
    out: Path,
    state_dir: Path | None = None,
    client_id: str | None = None,
    merge: bool = False,
    dtype: str = "float32",
    eval_data: Path | None = None,
    base_override: str | None = None,
    hub: HubTarget | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> ExportResult:
    """Write the global (or one client's personalised) model as a PEFT adapter or merged model, with a card.

    Everything that can fail (the checkpoint, the client state, the base model, the evaluation data, Hub
    credentials) is checked before anything is written; the folder then appears whole or not at all. A push
    that fails after the export leaves the complete folder and says so.
    """
    global_dir, out = Path(global_dir), Path(out)
    if dtype not in DTYPES:
        raise FedloraError(f"--dtype must be one of {', '.join(DTYPES)}; got '{dtype}'")
    if hub is not None:
        check_hub_access(hub)
    ckpt = checkpoint.read_global(global_dir)
    if ckpt.manifest.correction_digests and not merge:
        raise FedloraError(
            f"{global_dir} carries a dense base-weight correction ('exact' aggregation) that a PEFT adapter cannot "
            "hold: export it with --merge"
        )
    replace = _check_out(out, overwrite, [global_dir, *([Path(state_dir)] if state_dir is not None else [])])
    if client_id is not None:
        checkpoint.check_client_id(client_id)
        if state_dir is None:
            state_dir = _run_state_dir(global_dir, client_id)
    state = None
    if state_dir is not None:
        # load_for_evaluation checks the state belongs to this client and federation; here only its round.
        if not Path(state_dir).is_dir():
            raise FedloraError(f"client state not found: {state_dir}")
        state = checkpoint.latest_state(state_dir, before_round=ckpt.manifest.round + 1)
        if state is None:
            raise FedloraError(f"client state {state_dir} holds no trained round up to round {ckpt.manifest.round}")
    bench, manifest = federation.load_for_evaluation(global_dir, state_dir, client_id, base_override)
    who = state.manifest.client_id if state is not None else None

    # Saved as loaded: tokenising for evaluation leaves truncation and padding settings in a fast tokenizer.
    tokenizer = copy.deepcopy(bench.tokenizer)
    if eval_data is not None:
        metrics = federation.evaluate(global_dir, eval_data, state_dir, who, base_override, bench=bench, progress=progress)
        evaluation = [_eval_row(metrics, _model_label(who), f"{eval_data} (evaluated at export)")]
    else:
        evaluation = run_metrics(global_dir, manifest, who)
    recipe_model = manifest.recipe["model"]
    base_ref = base_reference(recipe_model["base"], bench.base_location)
    notes = _notes(manifest, who)
    kind = "merged" if merge else "adapter"
    card = model_card(
        manifest, kind=kind, client_id=who, base_model=base_ref, hub_base_model=hub_id_of(recipe_model["base"]),
        license_id=base_license(bench.base_location, recipe_model.get("revision")), evaluation=evaluation,
        privacy_facts=privacy_facts(global_dir, manifest, state_dir), dtype=dtype, global_dir=global_dir,
    )

    with checkpoint.atomic_dir(out, overwrite=replace) as tmp:
        if merge:
            _write_merged(bench, tmp, dtype, manifest)
        else:
            _write_adapter(bench, tmp, dtype, base_ref)
        tokenizer.save_pretrained(str(tmp))
        (tmp / MODEL_CARD).write_text(card)
    files = sorted((p.name, p.stat().st_size) for p in out.iterdir() if p.is_file())
    result = ExportResult(
        out, kind, dtype, manifest.round, manifest.method, manifest.head, who, base_ref, files, evaluation, notes
    )
    if hub is not None:
        result.hub_url = push_to_hub(out, hub, default_message=f"fedlora export: {_title(manifest, who)}")
    return result


def _check_out(out: Path, overwrite: bool, sources: list[Path]) -> bool:
    """Refuse an output folder that is a file, non-empty without --overwrite, or holds/is inside an input."""
    target = out.resolve()
    for source in sources:
        s = source.resolve()
        if target == s or target in s.parents or s in target.parents:
            raise FedloraError(f"--out {out} must lie outside {source}")
    if out.exists() and not out.is_dir():
        raise FedloraError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FedloraError(f"{out} already exists and is not empty (pass --overwrite to replace it)")
        return True
    # An existing empty folder is taken as is; atomic_dir replaces it.
    return out.is_dir()


def _run_state_dir(global_dir: Path, client_id: str) -> Path:
    """A client's state folder in a simulate run (RUN/clients/ID beside RUN/global/round-NNN)."""
    from fedlora_cli import simulate

    run = global_dir.resolve().parent
    if run.name != simulate.GLOBAL_DIR:
        raise FedloraError(
            f"--client-id {client_id} needs --state (the client's state folder): {global_dir} is not in a run folder"
        )
    state_dir = simulate.RunLayout(run.parent).state(client_id)
    if not state_dir.is_dir():
        raise FedloraError(f"client '{client_id}' has no state in this run ({state_dir} not found)")
    return state_dir


def _write_adapter(bench: Workbench, folder: Path, dtype: str, base_ref: str) -> None:
    config = bench.model.peft_config["default"]
    previous = config.base_model_name_or_path
    config.base_model_name_or_path = base_ref
    try:
        bench.model.save_pretrained(str(folder))
    finally:
        config.base_model_name_or_path = previous
    # PEFT saves the tensors in the dtype they have (a base loaded in half precision gives half-precision LoRA).
    import torch
    from safetensors.torch import save_file

    path = folder / checkpoint.ADAPTER_WEIGHTS
    target = getattr(torch, dtype)
    tensors = checkpoint.load_tensors(path, "exported adapter")
    if any(t.is_floating_point() and t.dtype != target for t in tensors.values()):
        cast = {name: t.to(target) if t.is_floating_point() else t for name, t in tensors.items()}
        save_file(cast, str(path), metadata={"format": "pt"})


def _write_merged(bench: Workbench, folder: Path, dtype: str, manifest: GlobalManifest) -> None:
    """Fold the adapter into the base weights in float32, then cast; ``bench.model`` is consumed."""
    import torch

    model = bench.model.float()
    try:
        merged = model.merge_and_unload(safe_merge=True)
    except ValueError as exc:
        raise FedloraError(f"cannot merge the adapter: {str(exc).strip().splitlines()[0]}") from None
    if manifest.label_names:
        names = [str(name) for name in manifest.label_names]
        merged.config.id2label = dict(enumerate(names))
        merged.config.label2id = {name: i for i, name in enumerate(names)}
    merged = merged.to(getattr(torch, dtype))
    merged.save_pretrained(str(folder))


def _adapter_text(adapter: dict[str, Any]) -> str:
    kind = adapter.get("kind", "lora")
    targets = f"target modules {', '.join(adapter['target_modules'])}"
    if kind == "vera":
        return f"VeRA r={adapter['r']}, dropout={_num(adapter['dropout'], 2)}, {targets}"
    name = {"lora": "LoRA", "rslora": "rsLoRA"}.get(kind, kind)
    ranks = adapter.get("client_ranks") or {}
    hetero = f" (client ranks {', '.join(f'{c}: {r}' for c, r in ranks.items())})" if ranks else ""
    return f"{name} r={adapter['r']}{hetero}, alpha={_num(adapter['alpha'], 1)}, dropout={_num(adapter['dropout'], 2)}, {targets}"


def _notes(manifest: GlobalManifest, client_id: str | None) -> list[str]:
    kept = federation.plan_of(manifest).local
    if client_id is not None or not kept:
        return []
    what = " and ".join(sorted("the classifier head" if r == ROLE_HEAD else ROLE_LABELS[r] for r in kept))
    return [
        f"{METHOD_NAMES.get(manifest.method, manifest.method)} clients keep {what} at home: in the global model "
        f"{'they are' if len(kept) > 1 else 'it is'} still at the round-0 initialisation. "
        "Export with --state CLIENT_STATE for a client's personalised model."
    ]


# --------------------------------------------------------------------------------------------------------
# Facts for the model card


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


def _model_label(client_id: str | None) -> str:
    return f"personalised for {client_id}" if client_id else "global"


def _eval_row(metrics: dict[str, Any], model: str, data: str) -> dict[str, Any]:
    row = {
        "model": model, "data": data, "examples": metrics.get("examples"), "accuracy": metrics.get("accuracy"),
        "macro_f1": metrics.get("macro_f1"), "loss": metrics.get("loss"),
    }
    if "perplexity" in metrics:  # causal-lm
        row.update(perplexity=metrics.get("perplexity"), exact_match=metrics.get("exact_match"),
                   generated=metrics.get("generated"), max_new_tokens=metrics.get("max_new_tokens"))
    return row


def run_metrics(global_dir: Path, manifest: GlobalManifest, client_id: str | None) -> list[dict[str, Any]]:
    """The evaluation ``fedlora simulate`` wrote for this round (RUN/metrics/round-NNN.json), if any."""
    from fedlora_cli import simulate

    global_dir = Path(global_dir).resolve()
    if global_dir.parent.name != simulate.GLOBAL_DIR:
        return []
    path = simulate.RunLayout(global_dir.parent.parent).metrics(manifest.round)
    if not path.is_file():
        return []
    try:
        data = checkpoint.read_json(path, "round metrics")
    except FedloraError:
        return []
    if data.get("round") != manifest.round:
        return []
    where = f"the run's test split ({path.parent.name}/{path.name})"
    rows = []
    personal = (data.get("personalised") or {}).get(client_id) if client_id else None
    if isinstance(personal, dict):
        rows.append(_eval_row(personal, _model_label(client_id), where))
    if isinstance(data.get("global"), dict):
        rows.append(_eval_row(data["global"], "global", where))
    return rows


def privacy_facts(global_dir: Path, manifest: GlobalManifest, state_dir: Path | None) -> dict[str, Any]:
    """The recipe's differential-privacy settings and the budget spent, from the ledgers fedlora keeps.

    Sample-level DP-SGD spending is per client: the client's ledger (in its state) for a personalised
    export; for a global export the ledgers of every client found in the run folder, if it is one.
    DP-FedAvg spending at the coordinator is in the global checkpoint's manifest.
    """
    from fedlora_cli import privacy_report, simulate

    facts: dict[str, Any] = {}
    p = manifest.recipe.get("privacy")
    if p:
        states: list[Path] = []
        if state_dir is not None:
            states = [Path(state_dir)]
        else:
            run = Path(global_dir).resolve().parent
            clients = run.parent / simulate.CLIENTS_DIR
            if run.name == simulate.GLOBAL_DIR and clients.is_dir():
                states = sorted(d for d in clients.iterdir() if d.is_dir())
        spent: dict[str, float] = {}
        for s in states:
            state = checkpoint.latest_state(s, before_round=manifest.round + 1)
            if state is None or state.manifest.privacy is None:
                continue
            ledger = state.manifest.privacy
            eps = ledger.get("epsilon")
            if not isinstance(eps, (int, float)):
                eps = privacy.Ledger.from_dict(ledger).epsilon()
            spent[state.manifest.client_id] = float(eps)
        facts["dp_sgd"] = {
            "target_epsilon": p.get("target_epsilon"), "delta": p.get("delta"), "noise_multiplier": p.get("noise_multiplier"),
            "max_grad_norm": p.get("max_grad_norm"), "accountant": p.get("accountant"), "spent": spent,
        }
    if manifest.server_privacy_ledger:
        entry = privacy_report.server_entry(Path(global_dir))
        if entry is not None:
            sp = manifest.recipe.get("server_privacy") or {}
            facts["dp_fedavg"] = {
                "epsilon": entry["epsilon"], "delta": entry["delta"], "target_epsilon": sp.get("target_epsilon"),
                "releases": len(entry["history"]),
            }
    return facts


# --------------------------------------------------------------------------------------------------------
# Model card


def _title(manifest: GlobalManifest, client_id: str | None) -> str:
    who = f", personalised for {client_id}" if client_id else ""
    return f"{METHOD_NAMES.get(manifest.method, manifest.method)} round {manifest.round}{who}"


def _num(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _dataset_id(source: str | None) -> str | None:
    if not source or source.lower().endswith(_DATA_SUFFIXES):
        return None
    return hub_id_of(source)


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
    method_name = METHOD_NAMES.get(method, method)
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
        ("method", f"{method} ({method_name}): {METHOD_EXPLANATIONS.get(method, '')}"),
        ("classifier head", f"{manifest.head}: {HEAD_EXPLANATIONS.get(manifest.head, '')}") if not causal else
        ("task", "causal-lm: the loss is on the response tokens only; the LM head is part of the frozen base model"),
        ("rounds", f"{manifest.round} (of {fed['rounds']} planned)"),
        ("clients", f"{fed['clients']}" + aggregated),
        ("client weighting", str(fed.get("weighting", "-"))),
        ("partition", _partition_text(data)),
        ("labels", ", ".join(f"{i}: {name}" for i, name in enumerate(labels))) if not causal else
        ("data", f"prompt column '{data.get('prompt_column')}', response column '{data.get('response_column')}'"
                 + (", chat template" if data.get("chat_template") else "") + f", max length {data.get('max_length')}"),
        ("adapter", _adapter_text(adapter)),
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
                f"{_num(dp.get('max_grad_norm'), 3)}, "
                f"Gaussian noise multiplier {_num(dp.get('noise_multiplier'), 4)}, δ = {dp.get('delta'):g}, "
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
            f"| {r['model']} | {r['data']} | {_num(r['examples'])} | {_num(r['loss'])} | {_num(r.get('perplexity'), 2)} "
            f"| {_num(r.get('exact_match'))} |"
            for r in evaluation
        ]
        if cap:
            lines += ["", f"Exact match: greedy generation of at most {cap} new tokens, final number compared."]
    elif evaluation:
        lines += ["| model | data | examples | accuracy | macro-F1 | loss |", "|---|---|---|---|---|---|"]
        lines += [
            f"| {r['model']} | {r['data']} | {_num(r['examples'])} | {_num(r['accuracy'])} | {_num(r['macro_f1'])} "
            f"| {_num(r['loss'])} |"
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
        text += f", alpha {_num(data['alpha'], 3)}"
    if data["strategy"] in ("natural", "dirichlet") and data.get("by"):
        text += f", by column '{data['by']}'"
    if data["strategy"] == "size":
        sizes = data.get("sizes")
        text += f", sizes {', '.join(_num(v, 3) for v in sizes)}" if sizes else f", Dirichlet({_num(data['alpha'], 3)}) sizes"
    return text + f", seed {data['seed']}, test fraction {_num(data['test_fraction'], 3)}"


def _training_text(t: dict[str, Any]) -> str:
    amount = f"{t['local_steps']} steps" if t.get("local_steps") is not None else f"{t['local_epochs']:g} epochs"
    return f"{t['optimizer']}, lr {t['lr']:g}, {amount} of batch {t['batch_size']} per round, seed {t['seed']}"


# --------------------------------------------------------------------------------------------------------
# Hub


def check_hub_access(hub: HubTarget) -> None:
    """Refuse a push that cannot work (offline, not logged in, bad repo id) before anything is exported."""
    from huggingface_hub import constants, get_token
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(hub.repo_id)
    except HFValidationError as exc:
        raise FedloraError(f"--push-to-hub: '{hub.repo_id}' is not a Hub repo id ({_first(exc)})") from None
    if constants.HF_HUB_OFFLINE:
        raise FedloraError(
            "cannot push to the Hub: offline mode is on (HF_HUB_OFFLINE=1); export without --push-to-hub "
            "and upload the folder later"
        )
    if hub.token is None and get_token() is None:
        raise FedloraError("cannot push to the Hub: not logged in (run 'hf auth login', set HF_TOKEN or pass --token)")


def push_to_hub(folder: Path, hub: HubTarget, default_message: str = "fedlora export") -> str:
    """Create the repo (and branch) if needed and upload the folder as one commit; returns the commit URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=hub.token)
    try:
        # private=None keeps the Hub's (or the organisation's) default for a new repo; an existing repo keeps its own.
        repo = api.create_repo(hub.repo_id, private=True if hub.private else None, exist_ok=True, repo_type="model")
        repo_id = getattr(repo, "repo_id", None) or hub.repo_id
        if hub.revision:
            api.create_branch(repo_id, branch=hub.revision, exist_ok=True, repo_type="model")
        commit = api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), revision=hub.revision, repo_type="model",
            commit_message=hub.commit_message or default_message,
        )
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        reason = "not authorised (check the token and its write access)" if status in (401, 403) else _first(exc)
        raise FedloraError(f"exported {folder}, but pushing to {hub.repo_id} failed: {reason}") from None
    except (OSError, ValueError) as exc:  # OfflineModeIsEnabled and connection errors are OSErrors
        raise FedloraError(f"exported {folder}, but pushing to {hub.repo_id} failed: {_first(exc)}") from None
    url = getattr(commit, "commit_url", None) or str(getattr(repo, "url", "") or repo)
    return str(url)


def _first(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else exc.__class__.__name__
