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

When the head reads a masked pooling (``model.pooling`` mean, max or cls, ``auto`` as the global checkpoint resolved
it) either folder also holds ``fedlora_pooling.py`` (fedlora's pooling module): a merged folder names it in
``config.auto_map``, so ``from_pretrained(folder, trust_remote_code=True)`` reads the pooling as fedlora trained
it; for an adapter, the base needs ``fedlora_pooling.install(base, mode)`` before PEFT loads
it (the card's snippet). Loaded without it, the stock class has no trained pooler: a random one, not the model.

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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedlora_cli import federation, privacy, storage
from fedlora_cli.errors import FedloraError, first_line
from fedlora_cli.export.hub import HubTarget, check_hub_access, push_to_hub
from fedlora_cli.export.model_card import (
    MODEL_CARD, CardFacts, PrivacySpent, ServerPrivacy, base_reference, model_card, model_label,
)
from fedlora_cli.recipe.schema import TASK_CAUSAL_LM
from fedlora_cli.recipe.site_settings import plain_load
from fedlora_cli.storage.manifests import GlobalManifest

if TYPE_CHECKING:
    from fedlora_cli.model.workbench import Workbench


DTYPES = ("float32", "float16", "bfloat16")


@dataclass(kw_only=True)
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


def export(
    global_dir: Path,
    out: Path,
    *,
    state_dir: Path | None = None,
    client_id: str | None = None,
    merge: bool = False,
    dtype: str = "float32",
    eval_data: Path | None = None,
    base_override: str | None = None,
    hub: HubTarget | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
    device: str | None = None,
) -> ExportResult:
    """Write the global (or one client's personalised) model as a PEFT adapter or merged model, with a card.

    Everything that can fail (the checkpoint, the client state, the base model, the evaluation data, Hub
    credentials) is checked before anything is written; the folder then appears whole or not at all. A push
    that fails after the export leaves the complete folder and says so.

    The base model is loaded in float32 and unquantised whatever the recipe's site settings say: a merge folds
    the adapter into the real weights, never into a 4-bit copy of them. ``device`` (default the recipe's) is
    where the evaluation runs.
    """
    global_dir, out = Path(global_dir), Path(out)
    g = _checkpoint(global_dir, dtype, merge, hub)
    replace = _check_out(out, overwrite, [global_dir, *([Path(state_dir)] if state_dir is not None else [])])
    state_dir, who = _client_state(g, state_dir, client_id)
    bench, manifest = federation.load_for_evaluation(g, state_dir, client_id, base_override, site=plain_load(device))

    # Saved as loaded: tokenising for evaluation leaves truncation and padding settings in a fast tokenizer.
    tokenizer = copy.deepcopy(bench.tokenizer)
    evaluation = _evaluation(g, bench, eval_data, state_dir, who, base_override, progress)
    base_ref = base_reference(g.recipe.model.base, bench.base_location)
    facts = CardFacts.of_export(
        g, kind="merged" if merge else "adapter", dtype=dtype, client_id=who, base_model=base_ref,
        base_location=bench.base_location, evaluation=evaluation, privacy=privacy_facts(g, state_dir),
        resolved_format=resolved_format(g),
    )

    from fedlora_cli.model.workbench import quiet_transformers

    with storage.atomic_dir(out, overwrite=replace) as tmp, quiet_transformers():
        if merge:
            _write_merged(bench, tmp, dtype, manifest)
        else:
            _write_adapter(bench, tmp, dtype=dtype, base_ref=base_ref)
        tokenizer.save_pretrained(str(tmp))
        (tmp / MODEL_CARD).write_text(model_card(facts))
    files = sorted((p.name, p.stat().st_size) for p in out.iterdir() if p.is_file())
    result = ExportResult(
        path=out, kind=facts.kind, dtype=dtype, round=manifest.round, method=manifest.method, head=manifest.head,
        client_id=who, base_model=base_ref, files=files, evaluation=evaluation, notes=facts.notes,
    )
    if hub is not None:
        result.hub_url = push_to_hub(out, hub, default_message=f"fedlora export: {facts.title}")
    return result


def _checkpoint(global_dir: Path, dtype: str, merge: bool, hub: HubTarget | None) -> federation.Global:
    """The checkpoint to export, once the options and the Hub credentials are known to be good. Read once: the
    evaluation and the model card's facts all use it, its tensors checked once."""
    if dtype not in DTYPES:
        raise FedloraError(f"--dtype must be one of {', '.join(DTYPES)}; got '{dtype}'")
    if hub is not None:
        check_hub_access(hub)
    g = federation.Global.of(global_dir)
    if g.manifest.correction_digests and not merge:
        raise FedloraError(
            f"{global_dir} carries a dense base-weight correction ('exact' aggregation) that a PEFT adapter cannot "
            "hold: export it with --merge"
        )
    return g


def _client_state(
    g: federation.Global, state_dir: Path | None, client_id: str | None
) -> tuple[Path | None, str | None]:
    """The state folder of the client to personalise for (in a simulate run, found from its id) and that client's
    id, or (None, None) for the global model; ``load_for_evaluation`` checks the state belongs to this client and
    federation, here only that it has a round this checkpoint can use."""
    if client_id is not None:
        storage.check_client_id(client_id)
        if state_dir is None:
            state_dir = _run_state_dir(g, client_id)
    if state_dir is None:
        return None, None
    round_ = g.manifest.round
    if not Path(state_dir).is_dir():
        raise FedloraError(f"client state not found: {state_dir}")
    state = storage.latest_state(state_dir, before_round=round_ + 1)
    if state is None:
        raise FedloraError(f"client state {state_dir} holds no trained round up to round {round_}")
    return state_dir, state.manifest.client_id


def _evaluation(
    g: federation.Global, bench: Workbench, eval_data: Path | None, state_dir: Path | None, who: str | None,
    base_override: str | None, progress: Callable[[int, int], None] | None,
) -> list[dict[str, Any]]:
    """The model card's evaluation rows: on ``eval_data`` now, else what the run recorded for this round."""
    if eval_data is None:
        return run_metrics(g, g.manifest, who)
    metrics = federation.evaluate(g, eval_data, state_dir, who, base_override, bench=bench, progress=progress)
    return [_eval_row(metrics, model=model_label(who), data=f"{eval_data} (evaluated at export)")]


def resolved_format(g: federation.Global) -> str | None:
    """What a causal-lm recipe's ``data.format: auto`` resolved to, as the run's own training partition recorded it
    (RUN/data, where simulate partitions); None for any other recipe, and where the run holds no partition (a
    coordinator never sees the sites' data). Never the evaluation data's: its columns say nothing of the layout
    the sites trained on."""
    from fedlora_cli.data.formats import AUTO
    from fedlora_cli.data.partition import recorded_format

    if g.recipe.model.task != TASK_CAUSAL_LM or g.recipe.data.format != AUTO:
        return None
    run = storage.RunLayout.of_global(g)
    return None if run is None else recorded_format(run.data)


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


def _run_state_dir(g: federation.Global, client_id: str) -> Path:
    """A client's state folder in a simulate run (RUN/clients/ID beside RUN/global/round-NNN)."""
    run = storage.RunLayout.of_global(g)
    if run is None:
        raise FedloraError(
            f"--client-id {client_id} needs --state (the client's state folder): {g.path} is not in a run folder"
        )
    state_dir = run.state(client_id)
    if not state_dir.is_dir():
        raise FedloraError(f"client '{client_id}' has no state in this run ({state_dir} not found)")
    return state_dir


def _write_adapter(bench: Workbench, folder: Path, *, dtype: str, base_ref: str) -> None:
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

    # A stock base reads its pooler; a head reading a masked pooling needs it installed first (card: how to load).
    _write_pooling(bench, folder, type(bench.model.get_base_model()).__name__)
    path = folder / storage.ADAPTER_WEIGHTS
    target = getattr(torch, dtype)
    tensors = storage.load_tensors(path, "exported adapter")
    if any(t.is_floating_point() and t.dtype != target for t in tensors.values()):
        cast = {name: t.to(target) if t.is_floating_point() else t for name, t in tensors.items()}
        save_file(cast, str(path), metadata={"format": "pt"})


def _write_merged(bench: Workbench, folder: Path, dtype: str, manifest: GlobalManifest) -> None:
    """Fold the adapter into the base weights in float32, then cast; ``bench.model`` is consumed."""
    import torch

    model = bench.model.float().cpu()
    try:
        merged = model.merge_and_unload(safe_merge=True)
    except ValueError as exc:
        raise FedloraError(f"cannot merge the adapter: {first_line(exc)}") from None
    if manifest.label_names:
        names = [str(name) for name in manifest.label_names]
        merged.config.id2label = dict(enumerate(names))
        merged.config.label2id = {name: i for i, name in enumerate(names)}
    merged = merged.to(getattr(torch, dtype))
    auto_map = _write_pooling(bench, folder, type(merged).__name__)
    if auto_map is not None:  # no stock architecture computes the masked pooling: it loads as custom code
        merged.config.auto_map = auto_map
    merged.save_pretrained(str(folder))


def _write_pooling(bench: Workbench, folder: Path, architecture: str) -> dict[str, str] | None:
    """With a masked pooling (``model.pooling`` mean, max or cls, as the global checkpoint resolved it), write the
    pooling module into the export; the ``auto_map`` that loads it."""
    from fedlora_cli.model import pooling

    if bench.pooling not in pooling.MODES:
        return None
    code, auto_map = pooling.remote_code(architecture, bench.pooling)
    (folder / pooling.REMOTE_CODE_FILE).write_text(code)
    return auto_map


def _eval_row(metrics: dict[str, Any], *, model: str, data: str) -> dict[str, Any]:
    row = {
        "model": model, "data": data, "examples": metrics.get("examples"), "accuracy": metrics.get("accuracy"),
        "macro_f1": metrics.get("macro_f1"), "loss": metrics.get("loss"),
    }
    if "perplexity" in metrics:  # causal-lm
        row.update(perplexity=metrics.get("perplexity"), exact_match=metrics.get("exact_match"),
                   generated=metrics.get("generated"), max_new_tokens=metrics.get("max_new_tokens"))
    return row


def run_metrics(
    global_dir: Path | storage.GlobalCheckpoint, manifest: GlobalManifest, client_id: str | None
) -> list[dict[str, Any]]:
    """The evaluation ``fedlora simulate`` wrote for this round (RUN/metrics/round-NNN.json), if any."""
    run = storage.RunLayout.of_global(global_dir)
    if run is None:
        return []
    path = run.metrics(manifest.round)
    if not path.is_file():
        return []
    try:
        data = storage.read_json(path, "round metrics")
    except FedloraError:
        return []
    if data.get("round") != manifest.round:
        return []
    where = f"the run's test split ({path.parent.name}/{path.name})"
    rows = []
    personal = (data.get("personalised") or {}).get(client_id) if client_id else None
    if isinstance(personal, dict):
        rows.append(_eval_row(personal, model=model_label(client_id), data=where))
    if isinstance(data.get("global"), dict):
        rows.append(_eval_row(data["global"], model="global", data=where))
    return rows


def privacy_facts(global_checkpoint: Path | federation.Global, state_dir: Path | None = None) -> PrivacySpent:
    """The privacy budget spent up to the checkpoint's round, from the ledgers fedlora keeps.

    Sample-level DP-SGD spending (with the recipe's ``privacy``) is per client: the client's ledger (in its state,
    ``state_dir``) for a personalised export; for a global export the ledgers of every client found in the run
    folder, if it is one. DP-FedAvg spending at the coordinator is in the global checkpoint's manifest.
    """
    from fedlora_cli.privacy import report as privacy_report

    g = federation.Global.of(global_checkpoint)
    clients: dict[str, float] = {}
    if g.recipe.privacy is not None:
        if state_dir is not None:
            states = [Path(state_dir)]
        else:
            run = storage.RunLayout.of_global(g)
            states = [s for s in run.client_states() if s.is_dir()] if run is not None else []
        clients = _dp_sgd_spent(states, g.manifest.round)
    entry = privacy_report.server_entry(g) if g.manifest.server_privacy_ledger else None
    server = None if entry is None else ServerPrivacy(
        epsilon=entry["epsilon"], delta=entry["delta"], accountant=entry["accountant"], releases=len(entry["history"])
    )
    return PrivacySpent(clients=clients, server=server)


def _dp_sgd_spent(states: list[Path], round_: int) -> dict[str, float]:
    """Each client's DP-SGD epsilon up to ``round_``, from the newest state it holds for that round or before."""
    spent: dict[str, float] = {}
    for s in states:
        state = storage.latest_state(s, before_round=round_ + 1)
        if state is None or state.manifest.privacy is None:
            continue
        ledger = state.manifest.privacy
        eps = ledger.get("epsilon")
        if not isinstance(eps, (int, float)):
            eps = privacy.Ledger.from_dict(ledger).epsilon()
        spent[state.manifest.client_id] = float(eps)
    return spent
