"""Recipes: one YAML file describes a whole federation.

A recipe has six sections, read top to bottom in the order the work happens::

    model:      which base model and which task ('sequence-classification' or 'causal-lm')
    data:       where the examples come from and how they are split across clients
    adapter:    the adapter every client trains: its kind (lora, rslora, vera), rank and targets
    federation: the federated method, the head policy, the aggregation strategy, rounds and clients
    training:   the local optimisation each client runs in a round
    evaluation: what ``evaluate`` measures beyond loss (causal-lm: generation and exact match)

and optional sections that switch something on: ``privacy`` (DP-SGD at every client), ``server_privacy``
(DP-FedAvg at the coordinator) and ``tracking`` (experiment trackers).

The task is one axis the rest of fedlora dispatches on: how a shard is read and encoded (:mod:`data`), which
model class is built (:mod:`modeling`), and which metrics are computed (:mod:`evaluation`). A few defaults
depend on it (:data:`TASK_DEFAULTS`): a causal LM adapts the attention projections and has no task head.

A few keys of model and training are site settings (how one site loads and runs the model: dtype, quantisation,
device, memory), declared in :mod:`.site_settings` and left out of the recipe's digest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from fedlora_cli.recipe.site_settings import (
    ACCUMULATION_STEPS, COMPUTE_DTYPE, DEVICE, DOUBLE_QUANT, DTYPE, GRADIENT_CHECKPOINTING, MIXED_PRECISION,
    QUANT_TYPE, QUANTIZATION, SITE_SETTINGS, THREADS, SiteSetting,
)

# The choices of the keys whose values name objects elsewhere, as plain data: the schema imports no runtime code.
# tests/recipe/test_schema.py checks each list against its registry (adapters.METHODS, aggregation.STRATEGIES, ...),
# so they cannot drift apart; validation asks the registries' objects what each choice can do.
METHOD_NAMES = ("fedavg", "ffa", "fedsa")  # adapters.METHODS
HEAD_POLICY_NAMES = ("shared", "local", "frozen")  # adapters.HEAD_POLICIES
ADAPTER_KIND_NAMES = ("lora", "rslora", "vera")  # adapters.ADAPTER_KINDS
AGGREGATIONS = ("mean", "svd", "exact", "median", "trimmed-mean")  # aggregation.STRATEGIES
NORM_BOUND_ACTIONS = ("clip", "reject")  # aggregation.norm_bound.ACTIONS
# federation.server_optimizer: 'none', or one of aggregation.SERVER_OPTIMIZERS
SERVER_OPTIMIZER_NAMES = ("none", "fedavgm", "fedadam", "fedyogi", "fedadagrad")
TRACKERS = ("tensorboard", "mlflow", "wandb")  # tracking.BACKENDS
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
        "model.pooling": "default",
    },
}
ANSWER_EXTRACTORS = ("none", "number")
# data.format: how causal-lm rows are laid out (fedlora_cli.data.formats.FORMATS; 'auto' picks one by the columns)
DATA_FORMATS = ("auto", "prompt-response", "messages", "prompt-completion", "alpaca")
OPTIMIZERS = ("sgd", "adamw")
# data.strategy: how a dataset is split across clients (the partitioners of fedlora_cli.data.partition). In code
# "strategy" alone means the aggregation strategy; the recipe key keeps its name, which is part of the format.
PARTITIONERS = ("iid", "dirichlet", "natural", "size")
WEIGHTINGS = ("examples", "shard", "uniform")
SAMPLINGS = ("fixed", "poisson")
# federation.update_encoding: storage.encoding.ENCODINGS
UPDATE_ENCODINGS = ("float32", "bfloat16", "int8")
VERA_D_INITIAL = 0.1
ACCOUNTANTS = ("prv", "rdp")
# How privacy.target_epsilon becomes DP-SGD noise: one sigma for the federation, or each client its own.
CALIBRATIONS = ("federation", "client")
# model.pooling: 'auto' (fedlora_cli.model.pooling_choice), the architecture's own, or a masked pooling
# (fedlora_cli.model.pooling.MODES)
POOLINGS = ("auto", "default", "mean", "max", "cls")
# federation.secure_aggregation.protocol: the protocols fedlora runs (Flower's SecAgg+, fedlora_cli.secure)
SECURE_PROTOCOLS = ("secagg+",)


def _help(text: str, default: Any = dataclasses.MISSING, **kwargs: Any) -> Any:
    """A dataclass field whose help text travels with it (shown by ``fedlora recipes show``)."""
    if default is not dataclasses.MISSING:
        kwargs["default"] = default
    return field(metadata={"help": text}, **kwargs)


def _site(setting: SiteSetting) -> Any:
    """The field of a site setting, its default and help as :mod:`.site_settings` declares them."""
    return _help(setting.help, setting.default)


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
    pooling: str = _help(
        "sequence-classification: what the task head reads. 'auto' reads the model's own sentence-transformers "
        "files (modules.json, 1_Pooling/config.json: mean, max or cls; other modes refused by name) and takes the "
        "architecture's pooler for a model without them; the round-0 global checkpoint records the choice. "
        "'default' is the architecture's own (BERT: its pooler over the first token); 'mean' and 'max' pool the "
        "last hidden states over the real tokens, 'cls' reads the first token's state without the pooler's dense "
        "layer (BERT-family encoders).",
        "auto",
    )
    dtype: str = _site(DTYPE)
    quantization: str = _site(QUANTIZATION)
    quant_type: str = _site(QUANT_TYPE)
    double_quant: bool = _site(DOUBLE_QUANT)
    compute_dtype: str = _site(COMPUTE_DTYPE)


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
    format: str = _help(
        "causal-lm: how the rows are laid out. 'prompt-response' (prompt_column -> response_column); 'messages' "
        "(a column of role/content turns, TRL's conversational format, multi-turn: the loss is on every assistant "
        "turn, rendered by the tokenizer's chat template); 'prompt-completion' (TRL's prompt/completion columns, "
        "strings or lists of turns; the loss is on the completion); 'alpaca' (instruction, optional input, output). "
        "'auto' picks the first whose columns the data has, in the order messages, prompt-response, "
        "prompt-completion, alpaca.",
        "auto",
    )
    messages_column: str = _help("causal-lm, format 'messages': column holding each row's list of turns.", "messages")
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
        "are simply concatenated (Alpaca rows: Alpaca's own prompt). Turns (format 'messages', conversational "
        "prompt-completion) always go through the chat template.",
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
    validation_fraction: float = _help(
        "Fraction of rows held out as the shared validation split, beside the test split: the split to choose "
        "learning rates, rounds and other settings on (simulate reports both; export --round best picks by it). "
        "0: no validation split.",
        0.1,
    )
    seed: int = _help("Seed of the test and validation splits and of the partition.", 0)
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
class SecureAggregationSection:
    """Secure aggregation (:mod:`fedlora_cli.secure`): the coordinator learns only the weighted sum of the updates."""

    protocol: str = _help("'secagg+' (Flower's SecAgg+, Bell et al. CCS 2020).", "secagg+")
    num_shares: int = _help("Shares each client's secret keys are split into (its neighbours, itself included); > 2.", 3)
    reconstruction_threshold: int = _help(
        "Shares needed to rebuild a secret: a round completes while every client keeps at least this many of its "
        "neighbours; below num_shares, at least 2. Also the fewest sites a round aggregates: federation.clients, "
        "and clients_per_round under fixed sampling, must be at least this; a Poisson sample that asks fewer is "
        "skipped (the global carried forward), so DP-FedAvg under secure aggregation must ask every client.", 2)
    clipping_range: float = _help(
        "Every value a site sends (its weighted difference from the received global) is clamped to "
        "+-clipping_range and quantised to 2^22 levels over that range: the quantisation step is "
        "2 x clipping_range / 2^22. Each site counts what it clamped; the coordinator reports the total and warns. "
        "Under DP-FedAvg it must be at least server_privacy.clip_norm.", 8.0)


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
    clients_per_round: int | None = _help(
        "Clients asked to train each round (a sample of the federation); default: every client. With "
        "sampling 'poisson' it is the expected number.",
        None,
    )
    sampling: str = _help(
        "How a round's clients are drawn: 'fixed' (clients_per_round of them, uniformly without replacement) or "
        "'poisson' (each client independently with rate clients_per_round / clients; DP-FedAvg needs it). Seeded "
        "by training.seed and the round and recorded in each global checkpoint, so the sample is public and "
        "DP-FedAvg claims no amplification by sampling.",
        "fixed",
    )
    client_ids: list[str] | None = _help(
        "The federation's client ids, for sampling; default: client-0 ... client-(clients-1), the ids "
        "'fedlora partition' writes.",
        None,
    )
    min_clients: int = _help(
        "Fewest client updates a round may aggregate: with fewer, 'aggregate' refuses and writes nothing. Any "
        "of the round's asked clients may be the ones that answer. A Poisson sample that asks fewer skips the "
        "round (the global carried forward); under DP-FedAvg it releases what its sample sends (nobody: noise "
        "only).",
        1,
    )
    server_optimizer: str = _help(
        "What the coordinator does with the round's aggregate: 'none' (it is the next global), or a server "
        "optimiser stepping along the pseudo-gradient (aggregate - global): 'fedavgm' (server momentum, Hsu et al. "
        "2019), 'fedadam', 'fedyogi', 'fedadagrad' (Reddi et al., ICLR 2021). Acts only on the tensors the "
        "method sends; its state lives in the global checkpoint.",
        "none",
    )
    server_lr: float | None = _help(
        "Server learning rate eta; default per optimiser: fedavgm 1.0, fedadam 0.01, fedyogi 0.01, fedadagrad 0.01.",
        None,
    )
    server_momentum: float = _help("Server momentum (fedavgm) or beta_1 (fedadam, fedyogi, fedadagrad).", 0.9)
    server_beta2: float = _help("beta_2 of fedadam and fedyogi.", 0.99)
    server_tau: float = _help(
        "Adaptivity tau of fedadam, fedyogi, fedadagrad (Reddi et al. tune it in 1e-5..1e-1); the second moment "
        "starts at tau^2.",
        1e-3,
    )
    update_encoding: str = _help(
        "How client updates travel: 'float32' (the sent tensors as they are), or their difference from the "
        "received global as 'bfloat16' (half the bytes) or blockwise absmax 'int8' (256 values per float32 scale: "
        "about a quarter), with the rounding error kept in the client state and added to the next round's "
        "difference (error feedback). Under DP-SGD the noised update is encoded: post-processing.",
        "float32",
    )
    secure_aggregation: SecureAggregationSection | None = _help(
        "Secure aggregation on Flower ({protocol, num_shares, reconstruction_threshold, clipping_range}): each "
        "site sends its difference from the received global masked, the coordinator unmasks only the weighted "
        "sum. Rules out per-update strategies (median, trimmed-mean, svd, exact), norm_bound_action 'reject' and "
        "update encodings; federation.norm_bound clips at the sites. simulate emulates the arithmetic only. "
        "Default: off.",
        None,
    )


@dataclass
class TrainingSection:
    optimizer: str = _help("Local optimizer: 'sgd' or 'adamw'. A fresh optimizer is built each round.", "adamw")
    lr: float = _help("Learning rate (FFA-LoRA typically wants about 10x the LoRA rate).", 5e-4)
    weight_decay: float = _help("Weight decay.", 0.0)
    momentum: float = _help("SGD momentum.", 0.0)
    local_steps: int | None = _help("Optimizer steps per round; exclusive with local_epochs.", 10)
    local_epochs: float | None = _help("Passes over the client's shard per round; exclusive with local_steps.", None)
    batch_size: int = _help(
        "Examples per optimizer step (the logical batch; under DP-SGD its expected size). "
        "gradient_accumulation_steps splits it into micro-batches without changing it.",
        32,
    )
    eval_batch_size: int = _help("Examples per forward pass in evaluation.", 128)
    group_by_length: bool = _help(
        "Batch examples of similar length together (each pass still shuffled, the batches of a pass shuffled), so "
        "batches pad little and steps compute less; off by default, as in Hugging Face's Trainer (on the "
        "quickstart it trained a round about 20% faster and ended 0.017 lower in one seed). Never under DP-SGD, "
        "whose Poisson sampling stays ungrouped.",
        False,
    )
    max_grad_norm: float | None = _help("Clip the gradient norm of each step (not DP clipping).", None)
    seed: int = _help("Seed of adapter initialisation and of local training.", 0)
    proximal_mu: float = _help(
        "FedProx (Li et al., MLSys 2020): adds mu/2 ||w - w_global||^2 over the trained tensors the client sends "
        "(not those it keeps); 0 turns it off.",
        0.0,
    )
    logit_adjustment: float = _help(
        "Logit-adjusted loss (Menon et al., ICLR 2021; FedLC, Zhang et al., ICML 2022), for label skew: each client "
        "trains on cross-entropy of logits + tau x log(pi), with pi its own shard's label distribution (Laplace "
        "smoothed: (count + 1) / (n + classes)), so it learns the class-conditional part and not its label prior; "
        "evaluation and export read the plain logits. This is tau; 0 (plain cross-entropy) turns it off, 1 is the "
        "papers' choice. sequence-classification only; refused under DP-SGD (the prior comes from the client's "
        "labels, so each example's loss would depend on the others').",
        0.0,
    )
    device: str = _site(DEVICE)
    mixed_precision: str = _site(MIXED_PRECISION)
    gradient_checkpointing: bool = _site(GRADIENT_CHECKPOINTING)
    gradient_accumulation_steps: int = _site(ACCUMULATION_STEPS)
    threads: int = _site(THREADS)


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
    calibration: str = _help(
        "How target_epsilon becomes the noise: 'federation' (one sigma for every client, the one the smallest "
        "client needs, calibrated at init from the partition) or 'client' (each client calibrates its own sigma "
        "to its own dataset size when it trains: the coordinator needs no sizes, larger clients add less noise).",
        "federation",
    )


@dataclass
class ServerPrivacySection:
    """Client-level DP at the coordinator (DP-FedAvg, see :mod:`fedlora_cli.privacy`)."""

    clip_norm: float = _help("Each client update's difference from the global is clipped to this L2 norm.")
    noise_multiplier: float = _help("Noise standard deviation as a multiple of clip_norm / clients.")
    delta: float = _help("DP delta for the client-level guarantee.", 1e-5)
    target_epsilon: float | None = _help("Refuse to aggregate a round that would exceed this epsilon.", None)


@dataclass
class TrackingSection:
    """Experiment trackers (see :mod:`fedlora_cli.tracking`). Like the site settings, not part of the recipe's
    digest: each command and site may choose its own (``--report-to``), whatever the recipe says."""

    report_to: list[str] = _help(
        "Trackers that simulate, train-client, aggregate and evaluate log to: any of 'tensorboard', 'mlflow', "
        "'wandb' (offline modes only: files under the run's tracking/ folder; each needs its extra, e.g. "
        "pip install 'fedlora[tensorboard]'). --report-to overrides it ('none' for none).",
        default_factory=list,
    )


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
    tracking: TrackingSection | None = None
    name: str = "federation"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """sha256 of the canonical JSON form without the site settings (:mod:`.site_settings`) and the trackers;
        identifies the federation's recipe in checkpoint manifests, however each site runs and watches it."""
        content = self.to_dict()
        content.pop("tracking")
        for setting in SITE_SETTINGS:
            content[setting.section].pop(setting.field)
        if content["federation"]["update_encoding"] == "float32":  # the default leaves digests as they were
            content["federation"].pop("update_encoding")
        for key, default in (("format", "auto"), ("messages_column", "messages")):  # same for the chat formats' keys
            if content["data"][key] == default:
                content["data"].pop(key)
        if content["federation"]["secure_aggregation"] is None:  # off by default: digests stay as they were
            content["federation"].pop("secure_aggregation")
        if content["training"]["logit_adjustment"] == 0.0:  # off by default: digests stay as they were
            content["training"].pop("logit_adjustment")
        if content.get("privacy") and content["privacy"]["calibration"] == "federation":  # the default: the same
            content["privacy"].pop("calibration")
        text = json.dumps(content, sort_keys=True, separators=(",", ":"))
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
    "tracking": TrackingSection,
}
# Sections that are absent (None) unless the recipe writes them.
_OPTIONAL_SECTIONS = ("privacy", "server_privacy", "tracking")
