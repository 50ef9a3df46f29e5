"""The model card (README.md) of an export: Hub metadata and how the federation trained the model, rendered by
:func:`model_card` from one :class:`CardFacts` (gathered by :meth:`CardFacts.of_export`)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

from fedlora_cli import federation
from fedlora_cli.adapters import HEAD_POLICIES, METHODS, adapter_kind
from fedlora_cli.adapters.roles import ROLE_HEAD, ROLE_LABELS
from fedlora_cli.data.formats import AUTO, AUTO_ORDER
from fedlora_cli.recipe.loading import resolve_location
from fedlora_cli.recipe.schema import TASK_CAUSAL_LM, DataSection, PrivacySection, Recipe, TrainingSection
from fedlora_cli.text import fmt

MODEL_CARD = "README.md"
# What the head reads under each masked pooling (fedlora_cli.model.pooling.MODES), in the card's words.
POOLING_READS = {
    "mean": "the masked mean of the last hidden states",
    "max": "the masked element-wise maximum of the last hidden states",
    "cls": "the first token's last hidden state (no pooler layer)",
}


# The card's layout; model_card() renders what goes into each ${placeholder} from a CardFacts.
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


@dataclass(frozen=True, kw_only=True)
class ServerPrivacy:
    """DP-FedAvg at the coordinator as its ledger in the global checkpoint states it: epsilon at delta, after
    ``releases`` released aggregates."""

    epsilon: float
    delta: float
    accountant: str | None
    releases: int


@dataclass(frozen=True)
class PrivacySpent:
    """The privacy budget spent up to the exported round, from the ledgers fedlora keeps (the settings it was spent
    under are the recipe's ``privacy`` and ``server_privacy``)."""

    # Each client's DP-SGD epsilon (client id -> epsilon), from the client ledgers found; empty: none found.
    clients: Mapping[str, float] = field(default_factory=dict)
    server: ServerPrivacy | None = None


@dataclass(frozen=True, kw_only=True)
class CardFacts:
    """Everything the model card states about an export, gathered in one place (:meth:`of_export`).

    What was exported (``kind`` 'adapter' or 'merged', in ``dtype``; the global model or ``client_id``'s), from
    which checkpoint (its round, method, head, adapter kind, labels, digests and the clients its round aggregated),
    under which recipe, with which base model (``base_model`` as the export names it; ``hub_base_model`` the Hub id
    for the card's metadata, None for a local base: the Hub rejects anything else), and what was measured and
    spent (``evaluation`` rows, ``privacy``).
    """

    recipe: Recipe
    round: int
    method: str
    head: str
    adapter_kind: str
    num_labels: int | None
    label_names: tuple[str, ...]
    aggregated: tuple[str, ...]
    kept_home: frozenset[str]  # the roles the method's clients keep at home
    recipe_digest: str
    checkpoint_digest: str
    checkpoint_name: str | None
    base_model: str
    kind: str = "adapter"
    dtype: str = "float32"
    client_id: str | None = None
    hub_base_model: str | None = None
    license_id: str | None = None
    evaluation: tuple[Mapping[str, Any], ...] = ()
    privacy: PrivacySpent = field(default_factory=PrivacySpent)
    # causal-lm, recipe data.format 'auto': the layout it resolved to, as a partition recorded it (None: unknown)
    resolved_format: str | None = None

    @classmethod
    def of_export(
        cls, g: federation.Global, *, kind: str = "adapter", dtype: str = "float32", client_id: str | None = None,
        base_model: str | None = None, base_location: str | None = None,
        evaluation: Sequence[Mapping[str, Any]] = (), privacy: PrivacySpent | None = None,
        resolved_format: str | None = None,
    ) -> CardFacts:
        """The facts of an export of global checkpoint ``g``. ``base_model`` (default the recipe's) is where the
        export says its base is; ``base_location``, the folder the base was loaded from, is where its license is
        read (none without it); ``resolved_format``, what a causal-lm recipe's ``data.format`` auto resolved to."""
        m, recipe = g.manifest, g.recipe
        labels = m.label_names or [f"LABEL_{i}" for i in range(m.num_labels or 0)]
        return cls(
            recipe=recipe, round=m.round, method=m.method, head=m.head, adapter_kind=m.adapter_kind,
            num_labels=m.num_labels, label_names=tuple(str(x) for x in labels), aggregated=tuple(m.clients),
            kept_home=frozenset(g.plan.local), recipe_digest=m.recipe_digest, checkpoint_digest=m.digest,
            checkpoint_name=g.path.name, base_model=base_model or recipe.model.base, kind=kind, dtype=dtype,
            client_id=client_id, hub_base_model=hub_id_of(recipe.model.base),
            license_id=base_license(base_location, recipe.model.revision) if base_location else None,
            evaluation=tuple(evaluation), privacy=privacy or PrivacySpent(), resolved_format=resolved_format,
        )

    @property
    def causal(self) -> bool:
        return self.recipe.model.task == TASK_CAUSAL_LM

    @property
    def data_format(self) -> str | None:
        """The layout of the causal-lm rows: the recipe's ``data.format``, or what ``auto`` resolved to (None when
        that is unknown here)."""
        data_format = self.recipe.data.format
        return self.resolved_format if data_format == AUTO else data_format

    @property
    def pooled(self) -> str | None:
        """The masked pooling the head reads (mean, max, cls: the global checkpoint's resolved ``model.pooling``);
        None when it reads the architecture's own (``default``, and checkpoints from before pooling existed)."""
        pooling = self.recipe.model.pooling
        return pooling if pooling in POOLING_READS else None

    @property
    def title(self) -> str:
        who = f", personalised for {self.client_id}" if self.client_id else ""
        return f"{METHODS[self.method].label} round {self.round}{who}"

    @property
    def notes(self) -> list[str]:
        """What a global export lacks: the tensors the method's clients keep at home."""
        kept = self.kept_home
        if self.client_id is not None or not kept:
            return []
        what = " and ".join(sorted("the classifier head" if r == ROLE_HEAD else ROLE_LABELS[r] for r in kept))
        return [
            f"{METHODS[self.method].label} clients keep {what} at home: in the global model "
            f"{'they are' if len(kept) > 1 else 'it is'} still at the round-0 initialisation. "
            "Export with --state CLIENT_STATE for a client's personalised model."
        ]


def _dataset_id(source: str | None) -> str | None:
    if not source or source.lower().endswith(_DATA_SUFFIXES):
        return None
    return hub_id_of(source)


def model_card(facts: CardFacts) -> str:
    """README.md with Hub metadata (YAML front matter) describing how the federation trained this model."""
    return _template().substitute(
        front_matter=_metadata(facts),
        name=facts.recipe.name,
        title=facts.title,
        intro=_intro(facts),
        aside=_block(_aside(facts)),
        training_rows="\n".join(f"| {k} | {v} |" for k, v in _training_rows(facts)),
        privacy_section=_block(_privacy_section(facts)),
        evaluation="\n".join(_evaluation_lines(facts.evaluation, facts.causal)),
        usage="\n".join(_usage_lines(facts)),
        base_note=_block(_base_note(facts)),
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


# The front matter's keys in the order fedlora has always written them (ModelCardData's own order differs).
_METADATA_ORDER = ["base_model", "library_name", "pipeline_tag", "license", "datasets", "tags"]


def _metadata(facts: CardFacts) -> str:
    """The YAML front matter the Hub reads (its base_model only for a Hub id: the Hub rejects anything else)."""
    from huggingface_hub import ModelCardData

    pipeline_tag = "text-generation" if facts.causal else "text-classification"
    tags = ["fedlora", "federated-learning", "lora", METHODS[facts.method].label.lower(), pipeline_tag]
    if facts.kind == "merged":
        tags.append("merged-lora")
    if _has_privacy(facts):
        tags.append("differential-privacy")
    if facts.client_id:
        tags.append("personalized")
    dataset = _dataset_id(facts.recipe.data.source)
    data = ModelCardData(
        base_model=facts.hub_base_model or None, library_name="peft" if facts.kind == "adapter" else "transformers",
        pipeline_tag=pipeline_tag, license=facts.license_id or None, datasets=[dataset] if dataset else None,
        tags=tags,
    )
    return data.to_yaml(original_order=_METADATA_ORDER)


def _intro(facts: CardFacts) -> str:
    what = "A LoRA adapter for" if facts.kind == "adapter" else (
        "A causal language model fine-tuned from" if facts.causal else "A sequence classifier fine-tuned from"
    )
    return (
        f"{what} `{facts.base_model}`, trained with federated learning by fedlora: "
        f"{facts.recipe.federation.clients} clients each trained on their own data, which never left them; "
        "only adapter tensors travelled to the coordinator."
        + (f" The LoRA update is merged into the base weights (saved in {facts.dtype})." if facts.kind == "merged"
           else "")
    )


def _aside(facts: CardFacts) -> list[str]:
    """Whose model this is: a client's personalised one, or a global one still missing what clients keep."""
    if facts.client_id:
        return [(
            f"This is client **{facts.client_id}**'s personalised model: the global adapter of round {facts.round} "
            "plus the tensors this client kept at home."
        )]
    return ["> " + note for note in facts.notes]


def _training_rows(facts: CardFacts) -> list[tuple[str, str]]:
    recipe = facts.recipe
    data, fed = recipe.data, recipe.federation
    method = METHODS[facts.method]
    aggregated = f" (last round aggregated: {', '.join(facts.aggregated)})" if facts.aggregated else ""
    task = ("task", "causal-lm: the loss is on the response tokens only; the LM head is part of the frozen base model")
    read = POOLING_READS[facts.pooled] if facts.pooled else "the architecture's own pooling"
    head = ("classifier head", f"{facts.head}: {HEAD_POLICIES[facts.head]}; it reads {read}")
    inputs = ("data", _causal_data(data, facts.data_format) + f", max length {data.max_length}")
    labels = ("labels", ", ".join(f"{i}: {name}" for i, name in enumerate(facts.label_names)))
    where = f" ({facts.checkpoint_name})" if facts.checkpoint_name is not None else ""
    return [
        ("method", f"{facts.method} ({method.label}): {method.explanation}"),
        task if facts.causal else head,
        ("rounds", f"{facts.round} (of {fed.rounds} planned)"),
        ("clients", f"{fed.clients}" + aggregated),
        ("client weighting", fed.weighting),
        ("partition", _partition_text(data)),
        inputs if facts.causal else labels,
        ("adapter", adapter_kind(facts.adapter_kind).describe(dataclasses.asdict(recipe.adapter))),
        ("local training", _training_text(recipe.training)),
        ("base model", f"`{facts.base_model}`"),
        ("recipe digest", f"`{facts.recipe_digest[:16]}`"),
        ("checkpoint digest", f"`{facts.checkpoint_digest[:16]}`" + where),
    ]


# The neighbouring relation the guarantees hold under (README "Privacy" says the same).
NEIGHBOURS = (
    "The guarantees are for *zero-out* neighbours: one example (DP-SGD) or one client's update (DP-FedAvg) "
    "replaced by one that contributes nothing. Each client update publishes its shard size and each global "
    "checkpoint names the clients it averaged, so the add-or-remove relation is not what they protect; swapping "
    "one example for an arbitrary other is covered at twice the epsilon and a delta of (1 + e^epsilon) delta "
    "(group privacy over two zero-outs)."
)


def _has_privacy(facts: CardFacts) -> bool:
    return facts.recipe.privacy is not None or facts.privacy.server is not None


def _privacy_section(facts: CardFacts) -> list[str]:
    """Sample-level DP-SGD at the clients and client-level DP-FedAvg at the coordinator, as far as they ran."""
    if not _has_privacy(facts):
        return []
    lines = ["## Differential privacy", ""]
    if facts.recipe.privacy is not None:
        lines += _dp_sgd_lines(facts.recipe.privacy, facts.privacy.clients)
    server = facts.privacy.server
    if server is not None:
        budget = facts.recipe.server_privacy.target_epsilon if facts.recipe.server_privacy is not None else None
        target = f" (budget {budget:g})" if budget is not None else ""
        lines += [
            "",
            (f"Client-level DP-FedAvg at the coordinator, {server.releases} release(s) of an aggregate: "
             f"ε = {server.epsilon:.3f} at δ = {server.delta:g}{target}"
             f"{', ' + server.accountant + ' accountant' if server.accountant else ''}."),
        ]
    return lines + ["", NEIGHBOURS]


def _dp_sgd_lines(dp: PrivacySection, spent: Mapping[str, float]) -> list[str]:
    budget = f", budget ε = {dp.target_epsilon:g} per client" if dp.target_epsilon is not None else ""
    noise = ("a Gaussian noise multiplier each client calibrated to its own dataset size (in its ledger)"
             if dp.calibration == "client" else f"Gaussian noise multiplier {fmt(dp.noise_multiplier, 4)}")
    lines = [(
        "Sample-level DP-SGD at every client: per-example gradients clipped to norm "
        f"{fmt(dp.max_grad_norm, 3)}, {noise}, δ = {dp.delta:g}, {dp.accountant} accountant{budget}."
    )]
    if not spent:
        return lines + [
            "",
            ("No client ledger was found beside this checkpoint; each client's spending is in its state folder "
             "(`fedlora privacy report STATE`)."),
        ]
    return lines + ["", "Privacy spent up to this round (each client's own ledger):", ""] + [
        f"- {cid}: ε = {eps:.3f} (δ = {dp.delta:g})" for cid, eps in spent.items()
    ]


def _evaluation_lines(evaluation: Sequence[Mapping[str, Any]], causal: bool) -> list[str]:
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


def _causal_data(data: Any, layout: str | None) -> str:
    """The rows' layout (``layout``: the recipe's ``data.format``, what ``auto`` resolved to, or None when that is
    unknown: each site's columns chose), with its columns."""
    templated = ", chat template" if data.chat_template else ""
    said = f"auto, resolved to {layout}: " if data.format == AUTO and layout is not None else ""
    if layout is None:
        return f"auto: each site's rows in the first layout their columns match ({', '.join(AUTO_ORDER)})" + templated
    if layout == "messages":
        return said + f"conversations in column '{data.messages_column}' (loss on the assistant turns), chat template"
    if layout in ("prompt-completion", "alpaca"):
        return said + f"{layout} rows" + templated
    return said + f"prompt column '{data.prompt_column}', response column '{data.response_column}'" + templated


def _usage_lines(facts: CardFacts) -> list[str]:
    """The Python snippet that loads this export, without its closing fence."""
    kind, base_model = facts.kind, facts.base_model
    if facts.causal:
        data = facts.recipe.data
        return _causal_usage(kind, base_model, chat_template=data.chat_template or facts.data_format == "messages")
    if kind == "adapter":
        lines = [
            "from peft import PeftModel",
            "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
            "",
            f'base = AutoModelForSequenceClassification.from_pretrained("{base_model}", num_labels={facts.num_labels})',
        ]
        if facts.pooled:
            lines[0:0] = ["import sys", ""]
            lines[-1:-1] = ['sys.path.insert(0, "LOCAL_COPY_OF_THIS_FOLDER")  # fedlora_pooling.py ships in it',
                            "from fedlora_pooling import install", ""]
            lines.append(f'install(base, "{facts.pooled}")  # the head reads {POOLING_READS[facts.pooled]}, as trained')
        lines.append('model = PeftModel.from_pretrained(base, "PATH_OR_REPO_OF_THIS_FOLDER").eval()')
    else:
        remote = ", trust_remote_code=True" if facts.pooled else ""  # fedlora_pooling.py: the pooling the head reads
        lines = [
            "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
            "",
            f'model = AutoModelForSequenceClassification.from_pretrained("PATH_OR_REPO_OF_THIS_FOLDER"{remote}).eval()',
        ]
    return lines + [
        'tokenizer = AutoTokenizer.from_pretrained("PATH_OR_REPO_OF_THIS_FOLDER")',
        'logits = model(**tokenizer(["some text"], return_tensors="pt")).logits',
        f"labels = {list(facts.label_names)!r}",
    ]


def _causal_usage(kind: str, base_model: str, *, chat_template: bool) -> list[str]:
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


def _base_note(facts: CardFacts) -> list[str]:
    if facts.kind != "adapter" or hub_id_of(facts.base_model) is not None:
        return []
    return [(
        f"`{facts.base_model}` is where the base model was on the machine that exported this adapter; "
        "replace it with your copy of the same base model."
    )]


def _partition_text(data: DataSection) -> str:
    text = data.strategy
    if data.strategy == "dirichlet":
        text += f", alpha {fmt(data.alpha, 3)}"
    if data.strategy in ("natural", "dirichlet") and data.by:
        text += f", by column '{data.by}'"
    if data.strategy == "size":
        sizes = data.sizes
        text += f", sizes {', '.join(fmt(v, 3) for v in sizes)}" if sizes else f", Dirichlet({fmt(data.alpha, 3)}) sizes"
    return text + f", seed {data.seed}, test fraction {fmt(data.test_fraction, 3)}"


def _training_text(t: TrainingSection) -> str:
    amount = f"{t.local_steps} steps" if t.local_steps is not None else f"{t.local_epochs:g} epochs"
    return f"{t.optimizer}, lr {t.lr:g}, {amount} of batch {t.batch_size} per round, seed {t.seed}"


def model_label(client_id: str | None) -> str:
    """Which model an evaluation row is of: the global one, or the one personalised for ``client_id``."""
    return f"personalised for {client_id}" if client_id else "global"
