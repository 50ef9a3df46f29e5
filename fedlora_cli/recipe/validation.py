"""Recipe validation: it builds nothing (no model, no data); it checks every value and rejects invalid
combinations with a message that names the key, e.g. ``recipe key 'training.lr' must be > 0``.

Command-line overrides (``fedlora aggregate --strategy median``) are applied to the recipe and validated here too,
by the same rules: ``labels`` then names each overridden key as the user wrote it (``--strategy``), so the
message speaks of the option, not of a key the user never typed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

from fedlora_cli.adapters import ADAPTER_KINDS, METHODS, adapter_kind
from fedlora_cli.aggregation import STRATEGIES, make_strategy
from fedlora_cli.errors import FedloraError
from fedlora_cli.recipe.schema import (
    ACCOUNTANTS, ADAPTER_KIND_NAMES, AGGREGATIONS, ANSWER_EXTRACTORS, CALIBRATIONS, DATA_FORMATS, HEAD_POLICY_NAMES,
    METHOD_NAMES, NORM_BOUND_ACTIONS, OPTIMIZERS, PARTITIONERS, POOLINGS, SAMPLINGS, SERVER_OPTIMIZER_NAMES, TASK_CAUSAL_LM, TASKS,
    TRACKERS, VERA_D_INITIAL, WEIGHTINGS, AdapterSection, DataSection, EvaluationSection, FederationSection,
    ModelSection, PrivacySection, Recipe, ServerPrivacySection, TrackingSection, TrainingSection,
)
from fedlora_cli.recipe.schema import SECURE_PROTOCOLS, UPDATE_ENCODINGS
from fedlora_cli.recipe.site_settings import DEVICE, MAX_THREADS, SITE_SETTINGS
from fedlora_cli.storage.checkpoints import valid_client_id


class _Check:
    """The rules' vocabulary: ``require`` a condition of a key, ``one_of`` a list; ``name`` of another key."""

    def __init__(self, labels: Mapping[str, str] | None, planned_clients: bool = True) -> None:
        self.labels = dict(labels or {})
        self.planned_clients = planned_clients

    def subject(self, key: str) -> str:
        return self.labels.get(key, f"recipe key '{key}'")

    def name(self, key: str) -> str:
        return self.labels.get(key, key)

    def require(self, condition: bool, key: str, message: str) -> None:
        if not condition:
            raise FedloraError(f"{self.subject(key)} {message}")

    def one_of(self, value: str, key: str, allowed: tuple[str, ...] | Mapping[str, object]) -> None:
        self.require(value in allowed, key, f"must be one of {', '.join(allowed)}; got {value!r}")


def validate(recipe: Recipe, labels: Mapping[str, str] | None = None, planned_clients: bool = True) -> Recipe:
    """Reject out-of-range values and invalid combinations; returns the recipe unchanged.

    ``labels`` (key -> how the user set it, e.g. ``{'federation.aggregation': '--strategy'}``) names overridden
    keys in the messages. ``planned_clients=False`` skips the rules about ``federation.clients`` (a trimmed mean
    that trims none of them): a round checks them against the client updates that actually arrived.
    """
    c = _Check(labels, planned_clients)
    _finite(c, recipe)
    _model(c, recipe.model)
    _data(c, recipe.data, recipe.federation.clients)
    _task(c, recipe)
    _evaluation(c, recipe.evaluation)
    _adapter(c, recipe.adapter)
    _federation(c, recipe.federation, recipe.adapter)
    _training(c, recipe.training)
    _site_values(c, recipe)
    _site(c, recipe)
    if recipe.privacy is not None:
        _privacy(c, recipe.privacy, recipe.adapter, recipe.training)
    if recipe.server_privacy is not None:
        _server_privacy(c, recipe.server_privacy, recipe.federation)
    if recipe.tracking is not None:
        _tracking(c, recipe.tracking)
    if recipe.federation.secure_aggregation is not None:
        _secure_aggregation(c, recipe)
    return recipe


def _finite(c: _Check, recipe: Recipe) -> None:
    """Every number of the recipe finite: YAML's .inf and .nan pass most range rules (inf > 0) and then overflow
    the arithmetic after the clients trained."""
    for section in dataclasses.fields(recipe):
        values = getattr(recipe, section.name)
        if not dataclasses.is_dataclass(values):
            continue
        for f in dataclasses.fields(values):
            value = getattr(values, f.name)
            if isinstance(value, float):
                c.require(math.isfinite(value), f"{section.name}.{f.name}", f"must be a finite number; got {value}")


# The coordinator steps in float32: a value it multiplies by must be a float32, and server_tau's square (the
# second moment's start) a normal float32, neither overflowing to inf nor vanishing to 0.
_FLOAT32_MAX = 3.4e38
_TAU_RANGE = (1e-18, 1e18)


def _model(c: _Check, m: ModelSection) -> None:
    c.require(bool(m.base.strip()), "model.base", "must name a model")
    c.one_of(m.task, "model.task", TASKS)
    c.require(m.num_labels is None or m.num_labels >= 2, "model.num_labels", "must be at least 2")
    c.one_of(m.pooling, "model.pooling", POOLINGS)


def _data(c: _Check, d: DataSection, clients: int) -> None:
    c.one_of(d.strategy, "data.strategy", PARTITIONERS)
    c.require(d.alpha > 0, "data.alpha", "must be > 0")
    c.require(d.strategy != "natural" or d.by is not None, "data.by", "is required when data.strategy is 'natural'")
    if d.strategy == "size" and d.sizes is not None:
        c.require(len(d.sizes) == clients, "data.sizes", f"must give one size per client ({clients}); got {len(d.sizes)}")
        c.require(all(v > 0 for v in d.sizes), "data.sizes", "must all be > 0")
    c.require(d.sizes is None or d.strategy == "size", "data.sizes", f"applies only to data.strategy 'size'; got {d.strategy!r}")
    c.require(0 < d.test_fraction < 1, "data.test_fraction", "must be between 0 and 1")
    c.require(0 <= d.validation_fraction < 1, "data.validation_fraction", "must be at least 0 and below 1")
    c.require(d.test_fraction + d.validation_fraction < 1, "data.validation_fraction",
              f"and data.test_fraction ({d.test_fraction}) must leave rows to train on (sum below 1)")
    c.require(d.max_length >= 2, "data.max_length", "must be at least 2")
    c.require(d.labels is None or len(d.labels) >= 2, "data.labels", "must list at least two labels")


def _task(c: _Check, recipe: Recipe) -> None:
    """What model.task allows of the other sections."""
    m, d, f = recipe.model, recipe.data, recipe.federation
    if m.task != TASK_CAUSAL_LM:
        c.require(recipe.evaluation.answer == "none", "evaluation.answer", "applies only to model.task 'causal-lm'")
        c.require(not d.chat_template, "data.chat_template", "applies only to model.task 'causal-lm'")
        c.require(d.format == "auto", "data.format", "applies only to model.task 'causal-lm'")
        return
    c.one_of(d.format, "data.format", DATA_FORMATS)
    c.require(recipe.training.logit_adjustment == 0, "training.logit_adjustment",
              "applies only to model.task 'sequence-classification' (it offsets class logits by the label prior)")
    c.require(m.num_labels is None, "model.num_labels", "does not apply to model.task 'causal-lm' (a causal LM has no classes)")
    c.require(m.pooling == "default", "model.pooling", "must be 'default' for model.task 'causal-lm' (it has no task head)")
    c.require(d.labels is None, "data.labels", "does not apply to model.task 'causal-lm' (its data has no labels)")
    c.require(
        d.strategy != "dirichlet" or d.by is not None,
        "data.by",
        "is required when data.strategy is 'dirichlet' on a causal-lm dataset (the skew is over a category column)",
    )
    c.require(
        f.head == "frozen",
        "federation.head",
        f"must be 'frozen' for model.task 'causal-lm': a causal LM has no task head (its LM head is part of the "
        f"frozen base model); got {f.head!r}",
    )
    c.require(d.format not in ("auto", "prompt-response") or d.prompt_column != d.response_column,
              "data.response_column", "must differ from data.prompt_column")


def _evaluation(c: _Check, e: EvaluationSection) -> None:
    c.one_of(e.answer, "evaluation.answer", ANSWER_EXTRACTORS)
    c.require(e.max_new_tokens >= 1, "evaluation.max_new_tokens", "must be at least 1")
    c.require(e.generate_examples is None or e.generate_examples >= 1, "evaluation.generate_examples", "must be at least 1")


def _adapter(c: _Check, a: AdapterSection) -> None:
    c.one_of(a.kind, "adapter.kind", ADAPTER_KIND_NAMES)
    c.require(a.r >= 1, "adapter.r", "must be at least 1")
    c.require(a.alpha > 0, "adapter.alpha", "must be > 0")
    c.require(0 <= a.dropout < 1, "adapter.dropout", "must be in [0, 1)")
    c.require(len(a.target_modules) > 0, "adapter.target_modules", "must name at least one module")
    c.require(a.vera_d_initial != 0, "adapter.vera_d_initial", "must not be 0 (lambda_b and lambda_d would never move)")
    vector_kinds = [k for k, kind in ADAPTER_KINDS.items() if not kind.has_factors]
    c.require(
        a.kind in vector_kinds or a.vera_d_initial == VERA_D_INITIAL,
        "adapter.vera_d_initial",
        f"applies only to adapter.kind {' or '.join(repr(k) for k in vector_kinds)}; got kind '{a.kind}'",
    )


def _federation(c: _Check, f: FederationSection, a: AdapterSection) -> None:
    c.one_of(f.method, "federation.method", METHOD_NAMES)
    c.one_of(f.head, "federation.head", HEAD_POLICY_NAMES)
    c.one_of(f.weighting, "federation.weighting", WEIGHTINGS)
    c.require(f.rounds >= 1, "federation.rounds", "must be at least 1")
    c.require(f.clients >= 1, "federation.clients", "must be at least 1")
    _aggregation(c, f, a)
    _participation(c, f)
    _server_optimizer(c, f)
    c.require(0 < f.trim_fraction < 0.5, "federation.trim_fraction", f"must be between 0 and 0.5; got {f.trim_fraction:g}")
    c.require(f.norm_bound is None or f.norm_bound > 0, "federation.norm_bound", f"must be > 0; got {f.norm_bound or 0:g}")
    c.one_of(f.norm_bound_action, "federation.norm_bound_action", NORM_BOUND_ACTIONS)
    c.one_of(f.update_encoding, "federation.update_encoding", UPDATE_ENCODINGS)
    if not a.client_ranks:
        return
    mixing = [name for name, cls in STRATEGIES.items() if cls.mixes_ranks]
    c.require(
        STRATEGIES[f.aggregation].mixes_ranks,
        "adapter.client_ranks",
        f"needs {c.name('federation.aggregation')} {' or '.join(repr(s) for s in mixing)} "
        f"(only {', '.join(mixing)} combines different ranks); got {f.aggregation!r}",
    )
    for client_id, rank in a.client_ranks.items():
        c.require(valid_client_id(client_id), "adapter.client_ranks", f"names an invalid client id {client_id!r}")
        c.require(
            1 <= rank <= a.r,
            "adapter.client_ranks",
            f"gives {client_id!r} rank {rank}, which must lie between 1 and adapter.r ({a.r})",
        )


def _aggregation(c: _Check, f: FederationSection, a: AdapterSection) -> None:
    """The strategy must fit the method and the adapter kind, and the federation's number of clients."""
    c.one_of(f.aggregation, "federation.aggregation", AGGREGATIONS)
    strategy, label = STRATEGIES[f.aggregation], c.subject("federation.aggregation")
    if strategy.needs_factors:
        senders = [name for name, m in METHODS.items() if m.sends_both_factors]
        if not METHODS[f.method].sends_both_factors:
            raise FedloraError(
                f"{label} is '{f.aggregation}', which combines the products B_k A_k and so needs federation.method "
                f"{' or '.join(repr(m) for m in senders)} (the only method that sends both A and B); the federation "
                f"uses '{f.method}'"
            )
        factored = [name for name, kind in ADAPTER_KINDS.items() if kind.has_factors]
        if not adapter_kind(a.kind).has_factors:
            raise FedloraError(
                f"{label} is '{f.aggregation}', which needs adapter.kind {' or '.join(repr(k) for k in factored)} "
                f"(VeRA has no A and B to multiply); the federation uses '{a.kind}'"
            )
    if c.planned_clients and 0 < f.trim_fraction < 0.5:
        make_strategy(f).check_count(f.clients, c.subject("federation.trim_fraction"))


def _participation(c: _Check, f: FederationSection) -> None:
    """Who is asked each round (sampling) and how many must answer."""
    k = f.clients_per_round
    c.require(k is None or 1 <= k <= f.clients, "federation.clients_per_round",
              f"must lie between 1 and federation.clients ({f.clients}); got {k}")
    c.one_of(f.sampling, "federation.sampling", SAMPLINGS)
    c.require(f.sampling == "fixed" or k is not None, "federation.sampling",
              "'poisson' needs federation.clients_per_round (the expected number of clients a round asks)")
    if f.client_ids is not None:
        c.require(len(f.client_ids) == f.clients, "federation.client_ids",
                  f"must list federation.clients ({f.clients}) ids; got {len(f.client_ids)}")
        c.require(len(set(f.client_ids)) == len(f.client_ids), "federation.client_ids", "must not repeat an id")
        bad = next((i for i in f.client_ids if not valid_client_id(i)), None)
        c.require(bad is None, "federation.client_ids", f"names an invalid client id {bad!r}")
    most = f.clients if k is None or f.sampling == "poisson" else k
    c.require(1 <= f.min_clients <= most, "federation.min_clients",
              f"must lie between 1 and the clients a round asks ({most}); got {f.min_clients}")


def _server_optimizer(c: _Check, f: FederationSection) -> None:
    c.one_of(f.server_optimizer, "federation.server_optimizer", SERVER_OPTIMIZER_NAMES)
    c.require(f.server_lr is None or 0 < f.server_lr <= _FLOAT32_MAX, "federation.server_lr",
              f"must be > 0 and at most {_FLOAT32_MAX:g} (a float32); got {f.server_lr}")
    c.require(0 <= f.server_momentum < 1, "federation.server_momentum", "must be in [0, 1)")
    c.require(0 <= f.server_beta2 < 1, "federation.server_beta2", "must be in [0, 1)")
    low, high = _TAU_RANGE
    c.require(low <= f.server_tau <= high, "federation.server_tau",
              f"must lie between {low:g} and {high:g} (its square, the second moment's start, is a float32); "
              f"got {f.server_tau:g}")
    if f.server_optimizer != "none":
        fitting = [name for name, cls in STRATEGIES.items() if cls.optimisable]
        c.require(
            STRATEGIES[f.aggregation].optimisable,
            "federation.server_optimizer",
            f"steps along aggregate - global, which needs {c.name('federation.aggregation')} "
            f"{', '.join(repr(x) for x in fitting)}; got {f.aggregation!r}",
        )


def _training(c: _Check, t: TrainingSection) -> None:
    c.one_of(t.optimizer, "training.optimizer", OPTIMIZERS)
    c.require(t.lr > 0, "training.lr", "must be > 0")
    c.require(t.weight_decay >= 0, "training.weight_decay", "must be >= 0")
    c.require(0 <= t.momentum < 1, "training.momentum", "must be in [0, 1)")
    c.require(t.optimizer == "sgd" or t.momentum == 0, "training.momentum", "applies only to training.optimizer 'sgd'")
    c.require(
        (t.local_steps is None) != (t.local_epochs is None),
        "training.local_steps",
        "and 'training.local_epochs': set exactly one of them",
    )
    c.require(t.local_steps is None or t.local_steps >= 1, "training.local_steps", "must be at least 1")
    c.require(t.local_epochs is None or t.local_epochs > 0, "training.local_epochs", "must be > 0")
    c.require(t.batch_size >= 1, "training.batch_size", "must be at least 1")
    c.require(t.eval_batch_size >= 1, "training.eval_batch_size", "must be at least 1")
    c.require(t.max_grad_norm is None or t.max_grad_norm > 0, "training.max_grad_norm", "must be > 0")
    c.require(t.proximal_mu >= 0, "training.proximal_mu", "must be >= 0")
    c.require(t.logit_adjustment >= 0, "training.logit_adjustment", "must be >= 0")
    c.require(t.gradient_accumulation_steps >= 1, "training.gradient_accumulation_steps", "must be at least 1")
    c.require(0 <= t.threads <= MAX_THREADS, "training.threads",
              f"must be 0 (the process's own count) up to {MAX_THREADS}; got {t.threads}")
    c.require(
        t.gradient_accumulation_steps <= t.batch_size,
        "training.gradient_accumulation_steps",
        f"must be at most training.batch_size ({t.batch_size}): each micro-batch holds at least one example",
    )


def _site_values(c: _Check, recipe: Recipe) -> None:
    """Each site setting with a list of choices holds one of them (:mod:`.site_settings`); a device may also be
    'cuda:N'."""
    for setting in SITE_SETTINGS:
        value = setting.of(recipe)
        if setting is DEVICE:
            device, _, index = value.partition(":")
            c.require(
                device in DEVICE.choices and (not index or (device == "cuda" and index.isdigit())),
                DEVICE.key,
                f"must be one of {', '.join(DEVICE.choices)} or 'cuda:N'; got {value!r}",
            )
        elif setting.choices:
            c.one_of(value, setting.key, setting.choices)


def _site(c: _Check, recipe: Recipe) -> None:
    """What a site's settings rule out of the rest of the recipe."""
    m, f, t = recipe.model, recipe.federation, recipe.training
    c.require(
        m.quantization == "none" or f.aggregation != "exact",
        "model.quantization",
        f"'{m.quantization}' cannot be used with {c.name('federation.aggregation')} 'exact': its correction is "
        "added to the base weights, which a quantised base cannot hold",
    )
    if recipe.privacy is not None:
        c.require(
            t.mixed_precision != "fp16",
            "training.mixed_precision",
            "'fp16' cannot be used with DP-SGD: its loss scaling would scale the per-example gradients Opacus "
            "clips (use 'bf16')",
        )
        c.require(
            not t.gradient_checkpointing,
            "training.gradient_checkpointing",
            "cannot be used with DP-SGD: Opacus computes per-example gradients from the activations of the forward "
            "pass, which checkpointing discards and recomputes (use training.gradient_accumulation_steps to save memory)",
        )


def _privacy(c: _Check, p: PrivacySection, a: AdapterSection, t: TrainingSection) -> None:
    c.require(
        adapter_kind(a.kind).per_example_gradients,
        "privacy",
        f"(DP-SGD) does not support adapter.kind '{a.kind}': Opacus computes no per-example gradients for "
        f"{adapter_kind(a.kind).label}'s vectors",
    )
    c.require(
        p.target_epsilon is not None or p.noise_multiplier is not None,
        "privacy.target_epsilon",
        "or 'privacy.noise_multiplier' must be set",
    )
    c.require(p.target_epsilon is None or p.target_epsilon > 0, "privacy.target_epsilon", "must be > 0")
    c.require(0 < p.delta < 1, "privacy.delta", "must be between 0 and 1")
    c.require(p.max_grad_norm > 0, "privacy.max_grad_norm", "must be > 0")
    c.require(p.noise_multiplier is None or p.noise_multiplier >= 0, "privacy.noise_multiplier", "must be >= 0")
    c.one_of(p.accountant, "privacy.accountant", ACCOUNTANTS)
    c.one_of(p.calibration, "privacy.calibration", CALIBRATIONS)
    if p.calibration == "client":
        c.require(p.target_epsilon is not None, "privacy.calibration",
                  "'client' needs privacy.target_epsilon: each client calibrates its noise to that budget")
        c.require(p.noise_multiplier is None, "privacy.noise_multiplier",
                  "cannot be set with privacy.calibration 'client': each client calibrates its own")
    c.require(t.max_grad_norm is None, "training.max_grad_norm", "must be unset under privacy (DP-SGD clips per example)")
    c.require(
        t.proximal_mu == 0,
        "training.proximal_mu",
        "must be 0 under privacy: DP-SGD clips and noises per-example gradients, and the proximal term's gradient "
        "is not one of them (it would escape the clipping)",
    )
    c.require(
        t.logit_adjustment == 0,
        "training.logit_adjustment",
        "must be 0 under privacy: its label prior is computed from all of the client's labels, so each example's "
        "loss would depend on the others' and the per-example clipping would no longer bound one example's influence",
    )


def _server_privacy(c: _Check, sp: ServerPrivacySection, f: FederationSection) -> None:
    c.require(
        STRATEGIES[f.aggregation].linear,
        "server_privacy",
        f"(DP-FedAvg) needs {c.name('federation.aggregation')} 'mean'; got {f.aggregation!r}",
    )
    c.require(
        f.norm_bound is None,
        "federation.norm_bound",
        "must be unset under server_privacy (DP-FedAvg clips every update)",
    )
    c.require(
        f.clients_per_round is None or f.sampling == "poisson",
        "server_privacy",
        "(DP-FedAvg) with federation.clients_per_round needs federation.sampling 'poisson': its fixed "
        "denominator is the expected number of clients a Poisson sample asks",
    )
    c.require(sp.clip_norm > 0, "server_privacy.clip_norm", "must be > 0")
    c.require(sp.noise_multiplier >= 0, "server_privacy.noise_multiplier", "must be >= 0")
    c.require(sp.noise_multiplier * sp.clip_norm <= _FLOAT32_MAX, "server_privacy.noise_multiplier",
              f"times server_privacy.clip_norm (the noise's scale, a float32) must be at most {_FLOAT32_MAX:g}")
    c.require(0 < sp.delta < 1, "server_privacy.delta", "must be between 0 and 1")
    c.require(sp.target_epsilon is None or sp.target_epsilon > 0, "server_privacy.target_epsilon", "must be > 0")


# Under SecAgg+ at most modulus / quantisation range - 1 clients may be summed without overflow (2^32 / 2^22).
SECURE_MAX_CLIENTS = 2**32 // 2**22 - 1


def _secure_aggregation(c: _Check, recipe: Recipe) -> None:
    """Secure aggregation: the coordinator unmasks only the weighted sum, so whatever needs one update is refused
    by name, and the integer arithmetic's limits are checked."""
    f, key = recipe.federation, "federation.secure_aggregation"
    s = f.secure_aggregation
    c.one_of(s.protocol, f"{key}.protocol", SECURE_PROTOCOLS)
    c.require(s.num_shares > 2, f"{key}.num_shares", f"must be greater than 2; got {s.num_shares}")
    c.require(2 <= s.reconstruction_threshold < s.num_shares, f"{key}.reconstruction_threshold",
              f"must be at least 2 and below num_shares ({s.num_shares}); got {s.reconstruction_threshold}")
    c.require(s.clipping_range > 0 and math.isfinite(s.clipping_range), f"{key}.clipping_range",
              f"must be a positive number; got {s.clipping_range:g}")
    label = c.subject(key)
    strategy = STRATEGIES[f.aggregation]  # a non-linear strategy, whatever its name, needs more than the sum
    if not strategy.linear:
        linear = " or ".join(repr(name) for name, cls in STRATEGIES.items() if cls.linear)
        raise FedloraError(f"{label} rules out {c.name('federation.aggregation')} '{f.aggregation}': it is not "
                           f"linear in the updates (it needs {strategy.needs_each}), and the coordinator sees only "
                           f"their sum; use {linear}")
    sp = recipe.server_privacy
    c.require(sp is None or s.clipping_range >= sp.clip_norm, f"{key}.clipping_range",
              f"must be at least server_privacy.clip_norm ({sp.clip_norm if sp else 0:g}) under DP-FedAvg, so that no "
              "value of a site's clipped difference reaches the clamp (a clamp would bias the release unseen: under "
              f"DP-FedAvg a site reports no count); got {s.clipping_range:g}")
    if f.norm_bound is not None and f.norm_bound_action == "reject":
        raise FedloraError(f"{label} rules out {c.name('federation.norm_bound_action')} 'reject' (a server-side "
                           "norm bound): the coordinator never sees one update; 'clip' clips at each site")
    if f.update_encoding != "float32":
        raise FedloraError(f"{label} rules out {c.name('federation.update_encoding')} '{f.update_encoding}': "
                           "SecAgg+ quantises the difference itself")
    if f.weighting == "shard" or (f.weighting == "examples" and (recipe.privacy is not None or
                                                                 recipe.training.local_steps is None)):
        raise FedloraError(f"{label} with {c.name('federation.weighting')} '{f.weighting}' needs a bound on each "
                           "weight before training (training.local_steps x batch_size, without DP-SGD); use "
                           "'uniform', or 'examples' with training.local_steps")
    # Under Poisson sampling clients_per_round is only the expected count: a round may ask every client.
    asked = f.clients if f.sampling == "poisson" else (f.clients_per_round or f.clients)
    c.require(asked <= SECURE_MAX_CLIENTS, key,
              f"sums at most {SECURE_MAX_CLIENTS} clients a round (2^32 / 2^22 - 1); the federation asks {asked}")
    _secure_sample(c, recipe)


def _secure_sample(c: _Check, recipe: Recipe) -> None:
    """SecAgg+ sums no fewer than reconstruction_threshold sites: a population or fixed sample below it could
    never run a round, and a Poisson sample below it cannot be released exactly under DP-FedAvg."""
    f, t = recipe.federation, recipe.federation.secure_aggregation.reconstruction_threshold
    label = c.name("federation.secure_aggregation.reconstruction_threshold")
    c.require(f.clients >= t, "federation.clients",
              f"must be at least {label} ({t}) under secure aggregation: SecAgg+ sums no fewer sites; got {f.clients}")
    if f.sampling != "poisson":
        k = f.clients_per_round or f.clients
        c.require(k >= t, "federation.clients_per_round",
                  f"must be at least {label} ({t}) under secure aggregation: SecAgg+ sums no fewer sites, so every "
                  f"round would be skipped; got {k}")
    elif recipe.server_privacy is not None and f.clients_per_round is not None and f.clients_per_round < f.clients:
        raise FedloraError(
            f"{c.subject('server_privacy')} (DP-FedAvg) with {c.name('federation.secure_aggregation')} rules out "
            f"{c.name('federation.sampling')} 'poisson': a Poisson sample below {label} cannot be summed by SecAgg+, "
            f"and releasing noise alone for it would let one client move a release by up to {label} x C / m, beyond "
            "the C / m the accountant counts; ask every client each round (no federation.clients_per_round), or "
            "drop secure aggregation")


def _tracking(c: _Check, t: TrackingSection) -> None:
    for name in t.report_to:
        c.one_of(name, "tracking.report_to", TRACKERS)
    c.require(len(set(t.report_to)) == len(t.report_to), "tracking.report_to", "must not name a tracker twice")
