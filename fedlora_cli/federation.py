"""The federated workflow as importable functions: init, train a client, aggregate a round, evaluate.

Each function reads and writes the on-disk folders of :mod:`fedlora_cli.checkpoint`, so the same calls serve
a federation run by hand across machines and one scripted on a single machine (:mod:`fedlora_cli.simulate`).
A round ``t`` takes global checkpoint ``t-1`` to client updates of round ``t`` to global checkpoint ``t``.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedlora_cli import aggregation, checkpoint, privacy, recipe as recipes
from fedlora_cli.checkpoint import GlobalCheckpoint, GlobalManifest, StateManifest, UpdateManifest
from fedlora_cli.errors import FedloraError
from fedlora_cli.methods import (
    ROLE_A, ROLE_B, ROLE_LABELS, ROLE_PROJECTION, Plan, adapter_kind, plan as make_plan, role_of,
)
from fedlora_cli.modeling import Workbench, build

if TYPE_CHECKING:
    import torch

    from fedlora_cli.data import Examples, PromptResponses
    from fedlora_cli.training import DPSettings


def plan_of(manifest: GlobalManifest) -> Plan:
    return make_plan(manifest.method, manifest.head, manifest.adapter_kind)


def recipe_of(manifest: GlobalManifest) -> recipes.Recipe:
    return recipes.from_dict(manifest.recipe)


def digests(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    return {name: checkpoint.tensor_digest(t) for name, t in tensors.items()}


def frozen_digest(plan: Plan, tensor_digests: dict[str, str]) -> str | None:
    """One digest over every tensor no client may change (FFA's A, a frozen head); None if there are none."""
    frozen = {name: d for name, d in tensor_digests.items() if role_of(name) in plan.frozen}
    return checkpoint.combined_digest(frozen) if frozen else None


def frozen_labels(plan: Plan) -> str:
    """What a plan's frozen roles are called, e.g. 'A' (FFA-LoRA) or 'lambda_d / VeRA projections' (FFA-VeRA)."""
    order = list(ROLE_LABELS)
    return " / ".join(ROLE_LABELS[r] for r in sorted(plan.frozen, key=order.index)) or "tensors"


def _bench_for(
    manifest: GlobalManifest, base_override: str | None, bench: Workbench | None, rank: int | None = None
) -> Workbench:
    """A workbench for this federation with a LoRA adapter of ``rank`` (default: the global rank)."""
    recipe = recipe_of(manifest)
    rank = rank or recipe.adapter.r
    if bench is None:
        bench = build(recipe, manifest.num_labels, base_override, rank=rank)
    if bench.fingerprint != manifest.base_fingerprint:
        raise FedloraError(
            f"base model '{bench.base_location}' is not the one this federation started from "
            f"(fingerprint {bench.fingerprint}, global checkpoint expects {manifest.base_fingerprint})"
        )
    if bench.rank != rank:
        raise FedloraError(f"the model was built with adapter rank {bench.rank}, this client trains rank {rank}")
    _check_projections(bench, manifest)
    # The global checkpoint's recipe governs (it carries the calibrated DP noise, for one).
    bench.recipe = recipe
    return bench


def _check_projections(bench: Workbench, manifest: GlobalManifest) -> None:
    """VeRA: the projections this site derived from the seed must be bit-identical to the global checkpoint's.

    They are never sent: every client regenerates them from ``training.seed`` (PEFT's projection_prng_key),
    so a site whose random number generator differs would silently train a different model.
    """
    derived = {n: t for n, t in bench.adapter_tensors().items() if role_of(n) == ROLE_PROJECTION}
    for name, t in sorted(derived.items()):
        expected = manifest.tensor_digests.get(name)
        if expected is None:
            raise FedloraError(f"the global checkpoint has no VeRA projection '{name}'")
        got = checkpoint.tensor_digest(t)
        if got != expected:
            raise FedloraError(
                f"VeRA projection '{name}' derived on this site from seed {manifest.seed} differs from the global "
                f"checkpoint's (digest {got[:12]}, expected {expected[:12]}): every client must derive identical "
                "projections; refusing to go on"
            )


def received_tensors(
    recipe: recipes.Recipe, global_tensors: dict[str, torch.Tensor], rank: int
) -> dict[str, torch.Tensor]:
    """The global adapter as a client of LoRA rank ``rank`` receives it: truncated to its rank (svd orders the
    factors by singular value) and rescaled to its LoRA scale. Unchanged for a client of the global rank."""
    a = recipe.adapter
    if rank == a.r:
        return global_tensors
    kind = adapter_kind(a.kind)
    ratio = kind.scale(a.alpha, a.r) / kind.scale(a.alpha, rank)
    result = dict(global_tensors)
    for a_name, b_name in aggregation.lora_layers(global_tensors).values():
        result[a_name], result[b_name] = aggregation.to_rank(global_tensors[a_name], global_tensors[b_name], rank, ratio)
    return result


def _load_client_model(
    bench: Workbench,
    plan: Plan,
    global_tensors: dict[str, torch.Tensor],
    state: checkpoint.ClientState | None,
    correction: dict[str, torch.Tensor] | None = None,
) -> None:
    """The client's model: the global's base-weight correction (exact aggregation), the global adapter at the
    client's rank, overlaid with the tensors the client keeps (FedSA's B, a local head)."""
    bench.apply_correction(correction)
    bench.load_adapter_tensors(received_tensors(bench.recipe, global_tensors, bench.rank))
    if state is not None:
        kept = state.tensors()
        if any(not plan.keeps(name) for name in kept):
            raise FedloraError(f"client state {state.path} holds tensors this method does not keep locally")
        bench.load_adapter_tensors(kept, partial=True)


def _verified_tensors(ckpt: GlobalCheckpoint) -> dict[str, torch.Tensor]:
    tensors = ckpt.tensors()
    if digests(tensors) != ckpt.manifest.tensor_digests:
        raise FedloraError(f"global checkpoint {ckpt.path}: tensors do not match the digests in its manifest")
    return tensors


def _verified_correction(ckpt: GlobalCheckpoint) -> dict[str, torch.Tensor]:
    correction = ckpt.correction()
    if digests(correction) != ckpt.manifest.correction_digests:
        raise FedloraError(f"global checkpoint {ckpt.path}: its correction does not match the digests in its manifest")
    return correction


# --------------------------------------------------------------------------------------------------------
# init


def init(
    recipe: recipes.Recipe,
    out: Path,
    partition: dict[str, Any] | None = None,
    base_override: str | None = None,
    bench: Workbench | None = None,
    overwrite: bool = False,
) -> GlobalCheckpoint:
    """Write the round-0 global checkpoint: the adapter with its seeded random A and zero B.

    ``partition`` (a partition manifest) gives the label names and, for a recipe with a privacy budget, the
    client dataset sizes the DP-SGD noise is calibrated for.
    """
    if partition is not None and partition.get("task", recipes.TASK_CLASSIFICATION) != recipe.model.task:
        raise FedloraError(
            f"the partition was made for task '{partition.get('task', recipes.TASK_CLASSIFICATION)}' but recipe key "
            f"'model.task' is '{recipe.model.task}': partition again with this recipe"
        )
    label_names, num_labels = task_labels(recipe, partition)
    out = Path(out)
    if out.exists() and not overwrite:
        raise FedloraError(f"{out} already exists (pass --overwrite to replace it)")
    recipe = calibrated(recipe, partition)
    if bench is None:
        bench = build(recipe, num_labels, base_override)
    plan = make_plan(recipe.federation.method, recipe.federation.head, recipe.adapter.kind)
    tensors = bench.adapter_tensors()
    tensor_digests = digests(tensors)
    manifest = GlobalManifest(
        round=0,
        method=recipe.federation.method,
        head=recipe.federation.head,
        adapter_kind=recipe.adapter.kind,
        base_model=recipe.model.base,
        base_fingerprint=bench.fingerprint,
        recipe=recipe.to_dict(),
        recipe_digest=recipe.digest(),
        seed=recipe.training.seed,
        num_labels=num_labels,
        label_names=label_names,
        tensor_digests=tensor_digests,
        digest=checkpoint.global_digest(tensor_digests),
        frozen_digest=frozen_digest(plan, tensor_digests),
    )
    return checkpoint.write_global(out, manifest, tensors, bench.adapter_config(), overwrite=overwrite)


def task_labels(recipe: recipes.Recipe, partition: dict[str, Any] | None) -> tuple[list[str] | None, int | None]:
    """Label names and number of classes of a sequence-classification federation; (None, None) for causal-lm."""
    if recipe.model.task == recipes.TASK_CAUSAL_LM:
        return None, None
    label_names = partition["label_names"] if partition is not None else None
    num_labels = recipe.model.num_labels or (len(label_names) if label_names else None)
    if num_labels is None:
        raise FedloraError("the number of labels is unknown: set model.num_labels or pass a partition folder")
    if label_names is not None and len(label_names) != num_labels:
        raise FedloraError(f"model.num_labels is {num_labels} but the partition has {len(label_names)} labels")
    return label_names, num_labels


def calibrated(recipe: recipes.Recipe, partition: dict[str, Any] | None) -> recipes.Recipe:
    """The recipe with ``privacy.noise_multiplier`` filled in from ``privacy.target_epsilon`` when unset."""
    import dataclasses

    p = recipe.privacy
    if p is None or p.noise_multiplier is not None:
        return recipe
    if partition is None:
        raise FedloraError(
            "privacy.target_epsilon needs the clients' dataset sizes to calibrate the noise: "
            "pass the partition folder (--data) or set privacy.noise_multiplier"
        )
    t = recipe.training
    plans = [privacy.client_plan(c["examples"], t.batch_size, t.local_steps, t.local_epochs) for c in partition["clients"]]
    # Calibrate a hair under the budget so that the per-round ledger, composed round by round, stays within it.
    target = dataclasses.replace(p, target_epsilon=p.target_epsilon * (1 - CALIBRATION_MARGIN))
    sigma = privacy.calibrate_federation(target, plans, recipe.federation.rounds)
    # Rounded up, never down: a smaller sigma than calibrated would spend more than the budget.
    sigma = math.ceil(sigma * 1e6) / 1e6
    return dataclasses.replace(recipe, privacy=dataclasses.replace(p, noise_multiplier=sigma))


CALIBRATION_MARGIN = 0.005
NO_ROUND_LIMIT = 1 << 62


# --------------------------------------------------------------------------------------------------------
# train-client


def _check_state(state: checkpoint.ClientState | None, client_id: str, manifest: GlobalManifest) -> None:
    if state is None:
        return
    if state.manifest.client_id != client_id:
        raise FedloraError(
            f"client state {state.path.parent} belongs to client '{state.manifest.client_id}', not '{client_id}'"
        )
    if state.manifest.recipe_digest != manifest.recipe_digest:
        raise FedloraError(f"client state {state.path.parent} was written for a different recipe")


def train_client(
    global_dir: Path,
    shard: Path,
    state_dir: Path,
    out: Path,
    client_id: str,
    base_override: str | None = None,
    bench: Workbench | None = None,
    progress: Callable[[int, int, float], None] | None = None,
    overwrite: bool = False,
) -> checkpoint.ClientUpdate:
    """Train one client for one round; write its client update (sent tensors) and its state (kept tensors)."""
    from fedlora_cli.data import read_examples
    from fedlora_cli.training import local_train, round_seed

    checkpoint.check_client_id(client_id)
    ckpt = checkpoint.read_global(global_dir)
    manifest = ckpt.manifest
    recipe = recipe_of(manifest)
    plan = plan_of(manifest)
    round_ = manifest.round + 1
    out = Path(out)
    if out.exists() and not overwrite:
        raise FedloraError(f"{out} already exists (pass --overwrite to replace it)")
    examples = read_examples(shard, recipe.data, recipe.model.task, manifest.num_labels)
    state = checkpoint.latest_state(state_dir, before_round=round_)
    # The newest state of all carries the privacy ledger: retraining a round must not forget its spending.
    newest = checkpoint.latest_state(state_dir, before_round=NO_ROUND_LIMIT)
    _check_state(newest, client_id, manifest)
    if newest is not None and newest.manifest.round > round_:
        raise FedloraError(
            f"client state {state_dir} is at round {newest.manifest.round}, ahead of this global checkpoint "
            f"(round {manifest.round}): wrong global checkpoint or wrong state folder"
        )
    if newest is not None and newest.manifest.round == round_ and not overwrite:
        raise FedloraError(
            f"client '{client_id}' already trained round {round_} (state {newest.path}); pass --overwrite to train it again"
        )
    global_tensors = _verified_tensors(ckpt)
    correction = _verified_correction(ckpt)
    bench = _bench_for(manifest, base_override, bench, recipe.adapter.rank_for(client_id))

    ledger, dp = _privacy_for_round(recipe, newest, len(examples), client_id)

    _load_client_model(bench, plan, global_tensors, state, correction)
    result = local_train(bench, plan, examples, round_seed(recipe.training.seed, client_id, round_), progress, dp)
    if ledger is not None:
        ledger.history.append((dp.noise_multiplier, dp.sample_rate, result.steps))

    tensors = bench.adapter_tensors()
    tensor_digests = digests(tensors)
    if frozen_digest(plan, tensor_digests) != manifest.frozen_digest:
        raise FedloraError(f"a frozen adapter tensor ({frozen_labels(plan)}) changed during training; nothing written")
    sent = {name: t for name, t in tensors.items() if plan.sends(name)}
    kept = {name: t for name, t in tensors.items() if plan.keeps(name)}
    bad = aggregation.nonfinite(sent) or aggregation.nonfinite(kept)
    if bad is not None:
        raise FedloraError(f"training diverged: tensor '{bad}' holds NaN or Inf (lower training.lr); nothing written")
    # Under DP-SGD only the noised tensors may leave the client. The mean training loss is a function of the data
    # with no noise, so it stays at home; the example count sent is the shard size, which the sample rate
    # (q = batch / n, part of what the accountant composes) already discloses, rather than the number of
    # distinct examples the secret Poisson sampling happened to draw.
    private = ledger is not None
    update_manifest = UpdateManifest(
        client_id=client_id,
        round=round_,
        parent_digest=manifest.digest,
        method=manifest.method,
        recipe_digest=manifest.recipe_digest,
        base_fingerprint=manifest.base_fingerprint,
        frozen_digest=manifest.frozen_digest,
        num_examples=len(examples) if private else result.num_examples,
        shard_examples=len(examples),
        steps=result.steps,
        loss=None if private else result.loss,
        seconds=round(result.seconds, 3),
        bytes=0,
        tensor_digests={name: tensor_digests[name] for name in sent},
        privacy=None if ledger is None else {k: v for k, v in ledger.to_dict().items() if k != "history"},
    )
    state_manifest = StateManifest(
        client_id=client_id,
        round=round_,
        parent_digest=manifest.digest,
        recipe_digest=manifest.recipe_digest,
        tensor_digests={name: tensor_digests[name] for name in kept},
        privacy=None if ledger is None else ledger.to_dict(),
        loss=result.loss,
    )
    # The state (with the ledger that records this round's spending) is written before the update: if the
    # update's write fails the ledger over-counts one round, never under-counts a release.
    checkpoint.write_state(Path(state_dir), state_manifest, kept)
    return checkpoint.write_update(out, update_manifest, sent, overwrite=overwrite)


def _privacy_for_round(
    recipe: recipes.Recipe, state: checkpoint.ClientState | None, examples: int, client_id: str
) -> tuple[privacy.Ledger | None, DPSettings | None]:
    """The client's ledger so far and this round's DP-SGD settings; refuses a round that would break the budget."""
    from fedlora_cli.training import DPSettings

    p = recipe.privacy
    if p is None:
        return None, None
    if p.noise_multiplier is None:
        raise FedloraError("the global checkpoint's recipe has no calibrated privacy.noise_multiplier")
    privacy.check_delta(p.delta, examples, f"client '{client_id}'")
    if state is None:
        ledger = privacy.Ledger(p.accountant, p.delta, p.target_epsilon, [])
    elif state.manifest.privacy is None:
        raise FedloraError(f"client state {state.path} has no privacy ledger; refusing to start a new one")
    else:
        ledger = privacy.Ledger.from_dict(state.manifest.privacy)
    t = recipe.training
    plan = privacy.client_plan(examples, t.batch_size, t.local_steps, t.local_epochs)
    dp = DPSettings(p.noise_multiplier, p.max_grad_norm, plan.sample_rate)
    if p.target_epsilon is not None:
        spent = ledger.epsilon()
        after = ledger.epsilon([(dp.noise_multiplier, dp.sample_rate, plan.steps_per_round)])
        if after > p.target_epsilon:
            raise FedloraError(
                f"privacy budget: client '{client_id}' has spent epsilon {spent:.3f} of {p.target_epsilon:g}; "
                f"this round would bring it to {after:.3f}. Nothing was trained or written"
            )
    return ledger, dp


# --------------------------------------------------------------------------------------------------------
# aggregate


@dataclass
class ClientRow:
    client_id: str
    num_examples: int
    shard_examples: int
    weight: float
    update_norm: float  # L2 norm of the update's difference from the tensors the client received
    bytes: int
    loss: float | None  # None under DP-SGD (the update does not carry it)
    rank: int | None = None  # the LoRA rank the client trained (None for VeRA)
    bound: str | None = None  # 'clipped' or 'rejected' by the norm bound


@dataclass
class AggregationSettings:
    """How one round is aggregated: the recipe's federation.aggregation settings, or their overrides."""

    strategy: str
    trim_fraction: float
    norm_bound: float | None
    norm_bound_action: str


@dataclass
class AggregateResult:
    checkpoint: GlobalCheckpoint
    clients: list[ClientRow] = field(default_factory=list)
    server_epsilon: float | None = None  # DP-FedAvg: client-level epsilon after this round
    server_ledger: Path | None = None  # DP-FedAvg: the coordinator's ledger this round was recorded in
    strategy: str = "mean"
    # svd / exact: per adapted layer, how far plain averaging of A and B would have been from the exact product.
    layers: dict[str, aggregation.LayerReport] = field(default_factory=dict)


def aggregation_settings(
    recipe: recipes.Recipe,
    strategy: str | None = None,
    norm_bound: float | None = None,
    norm_bound_action: str | None = None,
    trim_fraction: float | None = None,
) -> AggregationSettings:
    """The recipe's aggregation settings with any overrides, checked against the method and adapter kind."""
    f = recipe.federation
    settings = AggregationSettings(
        strategy=strategy or f.aggregation,
        trim_fraction=f.trim_fraction if trim_fraction is None else trim_fraction,
        norm_bound=f.norm_bound if norm_bound is None else norm_bound,
        norm_bound_action=norm_bound_action or f.norm_bound_action,
    )
    recipes.check_aggregation(settings.strategy, f.method, recipe.adapter.kind, "aggregation strategy")
    if recipe.adapter.client_ranks and settings.strategy != "svd":
        raise FedloraError(
            f"adapter.client_ranks gives clients different ranks, which only aggregation strategy 'svd' combines; "
            f"got '{settings.strategy}'"
        )
    if not 0 < settings.trim_fraction < 0.5:
        raise FedloraError(f"trim fraction must be between 0 and 0.5; got {settings.trim_fraction:g}")
    if settings.norm_bound is not None and not settings.norm_bound > 0:
        raise FedloraError(f"norm bound must be > 0; got {settings.norm_bound:g}")
    if settings.norm_bound_action not in recipes.NORM_BOUND_ACTIONS:
        raise FedloraError(
            f"norm bound action must be one of {', '.join(recipes.NORM_BOUND_ACTIONS)}; got '{settings.norm_bound_action}'"
        )
    return settings


def _expected_tensors(
    global_header: dict[str, tuple[str, tuple[int, ...]]], plan: Plan, recipe: recipes.Recipe, client_id: str
) -> dict[str, tuple[str, tuple[int, ...]]]:
    """dtype and shape of every tensor this client must send: the global's, at the client's LoRA rank."""
    rank = recipe.adapter.rank_for(client_id)
    expected = {}
    for name, (dtype, shape) in global_header.items():
        if not plan.sends(name):
            continue
        role = role_of(name)
        if role == ROLE_A:
            shape = (rank, *shape[1:])
        elif role == ROLE_B:
            shape = (shape[0], rank, *shape[2:])
        expected[name] = (dtype, shape)
    return expected


def _validate_update(
    update: checkpoint.ClientUpdate, manifest: GlobalManifest, expected: dict[str, Any], plan: Plan
) -> None:
    m, where = update.manifest, update.path
    if m.round != manifest.round + 1:
        raise FedloraError(f"client update {where} is for round {m.round}; this aggregation makes round {manifest.round + 1}")
    if m.method != manifest.method:
        raise FedloraError(f"client update {where} was trained with method '{m.method}', the federation uses '{manifest.method}'")
    if m.base_fingerprint != manifest.base_fingerprint:
        raise FedloraError(f"client update {where} was trained on a different base model")
    if m.recipe_digest != manifest.recipe_digest:
        raise FedloraError(f"client update {where} was trained with a different recipe")
    if m.parent_digest != manifest.digest:
        raise FedloraError(f"client update {where} was not trained from this global checkpoint (parent digest differs)")
    if m.frozen_digest != manifest.frozen_digest:
        labels = frozen_labels(plan)
        what = f"different frozen {labels}" if "/" in labels or ROLE_PROJECTION in plan.frozen else f"a different frozen {labels}"
        raise FedloraError(f"client update {where} was trained with {what} (frozen digest differs)")
    header = checkpoint.tensor_header(update.tensors_path, "client update tensors")
    missing = sorted(set(expected) - set(header))
    extra = sorted(set(header) - set(expected))
    if extra:
        raise FedloraError(f"client update {where} carries tensor '{extra[0]}', which method '{manifest.method}' does not send")
    if missing:
        raise FedloraError(f"client update {where} lacks tensor '{missing[0]}'")
    for name, (dtype, shape) in header.items():
        if (dtype, shape) != expected[name]:
            raise FedloraError(
                f"client update {where}: tensor '{name}' is {dtype}{list(shape)}, expected {expected[name][0]}{list(expected[name][1])}"
            )
    if set(m.tensor_digests) != set(header):
        raise FedloraError(f"client update {where}: manifest digests do not cover its tensors")


def _load_checked(update: checkpoint.ClientUpdate) -> dict[str, torch.Tensor]:
    """A client update's tensors, refused if any is not finite or does not match its manifest's digest."""
    tensors = checkpoint.load_tensors(update.tensors_path, "client update tensors")
    bad = aggregation.nonfinite(tensors)
    if bad is not None:
        raise FedloraError(f"client update {update.path}: tensor '{bad}' holds NaN or Inf")
    if digests(tensors) != update.manifest.tensor_digests:
        raise FedloraError(f"client update {update.path}: tensors do not match the digests in its manifest")
    return tensors


def _checked_updates(
    updates: Sequence[checkpoint.ClientUpdate], weights: Sequence[float]
) -> Iterator[tuple[checkpoint.ClientUpdate, dict[str, torch.Tensor], float]]:
    """Each update's tensors, read and checked (finite, digests) before they are yielded.

    The next update is read and checked on a second thread while the caller works on this one (hashing and
    file reads release the GIL), so at most two client updates are in memory at once.
    """
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(_load_checked, updates[0])
        for i, (update, weight) in enumerate(zip(updates, weights)):
            tensors = pending.result()
            if i + 1 < len(updates):
                pending = pool.submit(_load_checked, updates[i + 1])
            yield update, tensors, weight
            del tensors


@dataclass
class _Accepted:
    """A client update that passed the norm bound, read back one tensor at a time (layer-wise strategies)."""

    update: checkpoint.ClientUpdate
    weight: float
    clip: float  # the norm bound's scale of its difference from ``reference`` (1: untouched)
    reference: dict[str, torch.Tensor] | None  # what the client received, kept only when clipping needs it

    def get(self, name: str) -> torch.Tensor:
        t = checkpoint.read_tensor(self.update.tensors_path, name, "client update tensors")
        # Checked again as it is read: the file must still be the one screened in the first pass.
        if checkpoint.tensor_digest(t) != self.update.manifest.tensor_digests[name]:
            raise FedloraError(f"client update {self.update.path}: tensor '{name}' changed while aggregating")
        if self.clip != 1.0:
            ref = self.reference[name]
            t = (ref + (t - ref) * self.clip).to(t.dtype)
        return t


def aggregate_round(
    global_dir: Path,
    update_dirs: Sequence[Path],
    out: Path,
    weighting: str | None = None,
    server_privacy: recipes.ServerPrivacySection | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
    noise_seed: int | None = None,
    strategy: str | None = None,
    norm_bound: float | None = None,
    norm_bound_action: str | None = None,
    trim_fraction: float | None = None,
    server_ledger: Path | None = None,
) -> AggregateResult:
    """Validate every client update against the global checkpoint, combine the sent tensors, write round t.

    ``weighting`` (default: the recipe's ``federation.weighting``) is 'examples', 'shard' or 'uniform'.
    ``strategy``, ``norm_bound``, ``norm_bound_action`` and ``trim_fraction`` override the recipe's
    ``federation`` settings of the same names (``strategy`` is ``federation.aggregation``).
    ``server_privacy`` (default: the recipe's) turns on DP-FedAvg: clipped, equally weighted, noised. Its
    spending is checked against, and recorded in, the coordinator's ledger (``server_ledger``; default: the
    one beside ``global_dir``, see :func:`coordinator_ledger`) before the new global checkpoint is written.

    'mean' streams one client update at a time. The layer-wise strategies (svd, exact, median, trimmed-mean)
    first check every update in full, one at a time, then read the tensors back one layer (svd, exact) or
    one tensor name (median, trimmed-mean) at a time, re-checking each tensor's digest as it is read.
    """
    ckpt = checkpoint.read_global(global_dir)
    manifest = ckpt.manifest
    plan = plan_of(manifest)
    recipe = recipe_of(manifest)
    out = Path(out)
    if out.exists() and not overwrite:
        raise FedloraError(f"{out} already exists (pass --overwrite to replace it)")
    if not update_dirs:
        raise FedloraError("no client updates given")
    settings = aggregation_settings(recipe, strategy, norm_bound, norm_bound_action, trim_fraction)
    if server_privacy is not None and recipe.server_privacy is not None and server_privacy.target_epsilon is None:
        # A budget in the recipe binds DP-FedAvg asked for on the command line too.
        server_privacy = dataclasses.replace(server_privacy, target_epsilon=recipe.server_privacy.target_epsilon)
    server_privacy = server_privacy or recipe.server_privacy
    if server_privacy is not None and settings.strategy != "mean":
        raise FedloraError(f"DP-FedAvg (server privacy) averages: it needs aggregation strategy 'mean', not '{settings.strategy}'")
    if server_privacy is not None and settings.norm_bound is not None:
        raise FedloraError("a norm bound and DP-FedAvg (server privacy) do not go together: DP-FedAvg clips every update")
    coordinator = None if server_privacy is None else coordinator_ledger(ckpt, server_ledger)
    global_header = checkpoint.tensor_header(ckpt.weights_path, "global checkpoint weights")
    updates = [checkpoint.read_update(Path(p)) for p in update_dirs]
    seen: dict[str, Path] = {}
    for update in updates:
        if update.manifest.client_id in seen:
            raise FedloraError(
                f"client '{update.manifest.client_id}' appears twice ({seen[update.manifest.client_id]} and {update.path})"
            )
        seen[update.manifest.client_id] = update.path
        _validate_update(update, manifest, _expected_tensors(global_header, plan, recipe, update.manifest.client_id), plan)
    if settings.strategy == "trimmed-mean":
        recipes.check_trim(settings.trim_fraction, len(updates), "trim fraction")
    weighting = weighting or recipe.federation.weighting
    if weighting not in recipes.WEIGHTINGS:
        raise FedloraError(f"weighting must be one of {', '.join(recipes.WEIGHTINGS)}; got '{weighting}'")
    counts = [u.manifest.shard_examples if weighting == "shard" else u.manifest.num_examples for u in updates]
    weights = aggregation.client_weights(counts, uniform=weighting == "uniform")
    global_tensors = _verified_tensors(ckpt)
    correction = _verified_correction(ckpt)
    has_factors = adapter_kind(manifest.adapter_kind).has_factors
    rows: list[ClientRow] = []
    accepted: list[_Accepted] = []

    def reference_of(update: checkpoint.ClientUpdate) -> dict[str, torch.Tensor]:
        received = received_tensors(recipe, global_tensors, recipe.adapter.rank_for(update.manifest.client_id))
        return {name: received[name] for name in update.manifest.tensor_digests}

    def screen(
        update: checkpoint.ClientUpdate, tensors: dict[str, torch.Tensor], weight: float
    ) -> dict[str, torch.Tensor] | None:
        """Apply the norm bound to one checked update; None if it is rejected."""
        reference = reference_of(update)
        norm = aggregation.update_norm(tensors, reference)
        bound = None
        if settings.norm_bound is not None and norm > settings.norm_bound:
            bound = "rejected" if settings.norm_bound_action == "reject" else "clipped"
        m = update.manifest
        rank = recipe.adapter.rank_for(m.client_id) if has_factors else None
        rows.append(ClientRow(m.client_id, m.num_examples, m.shard_examples, weight, norm,
                              update.tensors_path.stat().st_size, m.loss, rank, bound))
        if bound == "rejected":
            return None
        clip = settings.norm_bound / norm if bound == "clipped" else 1.0
        accepted.append(_Accepted(update, weight, clip, reference if clip != 1.0 else None))
        return tensors if clip == 1.0 else aggregation.clip_to_norm(tensors, reference, settings.norm_bound)

    def stream() -> Iterator[tuple[dict[str, torch.Tensor], float]]:
        # Client updates in turn, each checked in full before it touches the running sum.
        for i, (update, tensors, weight) in enumerate(_checked_updates(updates, weights), start=1):
            tensors = screen(update, tensors, weight)
            if tensors is not None:
                yield tensors, weight
            if progress is not None:
                progress(i, len(updates))
        if not accepted:
            raise FedloraError(_all_rejected(settings, len(updates)))

    server_history = [list(e) for e in manifest.server_privacy_ledger]
    layers: dict[str, aggregation.LayerReport] = {}
    new_correction = dict(correction)
    if server_privacy is not None:
        sp = server_privacy
        assert coordinator is not None
        # Every client takes part in every round: sample rate 1 over the federation's clients.
        release = {
            "noise_multiplier": sp.noise_multiplier, "sample_rate": 1.0, "steps": 1, "delta": sp.delta,
            "round": manifest.round + 1, "parent_digest": manifest.digest, "out": str(out.resolve()),
            "created": time.time(),
        }
        server_history = [*coordinator.history(), [sp.noise_multiplier, 1.0, 1]]
        spent = privacy.epsilon([tuple(e) for e in server_history], sp.delta, "rdp")
        if sp.target_epsilon is not None and spent > sp.target_epsilon:
            raise FedloraError(
                f"server privacy budget: this release would bring client-level epsilon to {spent:.3f} "
                f"({len(server_history)} releases in {coordinator.path}), over server_privacy.target_epsilon "
                f"{sp.target_epsilon:g}; nothing written"
            )
        reference = {name: global_tensors[name] for name in global_header if plan.sends(name)}
        seed = noise_seed if noise_seed is not None else secrets.randbits(63)
        # The fixed denominator m of DP-FedAvg (McMahan et al. 2018): the federation's clients, not the number of
        # updates that arrived, so that adding or removing one client moves the average by at most C / m.
        m = recipe.federation.clients
        if len(updates) > m:
            raise FedloraError(
                f"DP-FedAvg: {len(updates)} client updates for a federation of federation.clients = {m}; "
                f"the noise is calibrated for at most {m}"
            )
        averaged = privacy.dp_fedavg(stream(), reference, sp.clip_norm, sp.noise_multiplier, m, seed)
    elif settings.strategy == "mean":
        averaged = aggregation.weighted_mean(stream())
        kept = sum(a.weight for a in accepted)
        if len(accepted) < len(updates):
            # Rejected clients leave the mean: renormalise over the weights of those that stayed.
            averaged = {n: (t.to(aggregation.accumulator_dtype(t.dtype)) / kept).to(t.dtype) for n, t in averaged.items()}
    else:
        for _ in stream():
            pass  # the first pass: every update checked in full and screened, one at a time
        averaged, layers, residuals = _layerwise(settings, recipe, accepted, global_header, plan)
        for layer, residual in residuals.items():
            previous = new_correction.get(layer)
            new_correction[layer] = residual if previous is None else (previous.to(residual.dtype) + residual)
    bad = aggregation.nonfinite(averaged)
    if bad is not None:
        raise FedloraError(f"the aggregate of tensor '{bad}' is not finite (overflow in the client updates); nothing written")
    new_tensors = {**global_tensors, **averaged}
    tensor_digests = digests(new_tensors)
    correction_digests = digests(new_correction)
    report = {
        "strategy": settings.strategy if server_privacy is None else "dp-fedavg",
        "norm_bound": settings.norm_bound,
        "norm_bound_action": settings.norm_bound_action if settings.norm_bound is not None else None,
        "clipped": [r.client_id for r in rows if r.bound == "clipped"],
        "rejected": [r.client_id for r in rows if r.bound == "rejected"],
    }
    if settings.strategy == "trimmed-mean":
        report["trim_fraction"] = settings.trim_fraction
    if layers:
        report["layers"] = {layer: dataclasses.asdict(r) for layer, r in layers.items()}
    new_manifest = GlobalManifest(
        **{
            **{k: getattr(manifest, k) for k in GlobalManifest.__dataclass_fields__},
            "round": manifest.round + 1,
            "tensor_digests": tensor_digests,
            "correction_digests": correction_digests,
            "digest": checkpoint.global_digest(tensor_digests, correction_digests),
            "frozen_digest": frozen_digest(plan, tensor_digests),
            "clients": [u.manifest.client_id for u in updates],
            "server_privacy_ledger": server_history,
            "server_privacy_delta": server_privacy.delta if server_privacy is not None else manifest.server_privacy_delta,
            "aggregation": report,
            "created": time.time(),
        }
    )
    if new_manifest.frozen_digest != manifest.frozen_digest:
        raise FedloraError("aggregation changed a frozen tensor; nothing written")
    adapter_config = checkpoint.read_json(ckpt.path / checkpoint.ADAPTER_CONFIG, "adapter config")
    if coordinator is not None:
        # Ledger first: if writing the checkpoint fails after this, the release is over-counted, never forgotten.
        coordinator.releases.append(release)
        checkpoint.write_server_ledger(coordinator)
    written = checkpoint.write_global(
        out, new_manifest, new_tensors, adapter_config, overwrite=overwrite, correction=new_correction
    )
    server_epsilon = None if server_privacy is None else spent
    return AggregateResult(written, rows, server_epsilon, None if coordinator is None else coordinator.path,
                           report["strategy"], layers)


def coordinator_ledger(ckpt: GlobalCheckpoint, path: Path | None = None) -> checkpoint.ServerLedger:
    """The coordinator's DP-FedAvg ledger for the federation ``ckpt`` belongs to.

    Default path: :func:`checkpoint.server_ledger_path`. Where there is no ledger yet, for
    instance on a new coordinator machine, it starts from the releases the checkpoint's manifest records.
    A ledger that knows fewer releases than the checkpoint's own history belongs elsewhere and is refused.
    """
    chain = ckpt.manifest.server_privacy_ledger
    path = Path(path) if path is not None else checkpoint.server_ledger_path(ckpt)
    ledger = checkpoint.read_server_ledger(path)
    if ledger is None:
        return checkpoint.ServerLedger(path, [
            {"noise_multiplier": s, "sample_rate": q, "steps": n, "from_manifest": str(ckpt.path.resolve())}
            for s, q, n in chain
        ])
    if len(ledger.releases) < len(chain):
        raise FedloraError(
            f"DP-FedAvg ledger {path} records {len(ledger.releases)} release(s) but global checkpoint {ckpt.path} "
            f"has {len(chain)} in its history: the ledger is not this federation's (give the right one with --server-ledger)"
        )
    return ledger



def _all_rejected(settings: AggregationSettings, count: int) -> str:
    return (
        f"all {count} client updates exceed the norm bound {settings.norm_bound:g} and were rejected; nothing written"
    )


def _layerwise(
    settings: AggregationSettings,
    recipe: recipes.Recipe,
    accepted: list[_Accepted],
    global_header: dict[str, tuple[str, tuple[int, ...]]],
    plan: Plan,
) -> tuple[dict[str, torch.Tensor], dict[str, aggregation.LayerReport], dict[str, torch.Tensor]]:
    """svd, exact, median, trimmed-mean over the accepted updates, one layer or tensor name at a time.

    Returns the new sent tensors, the per-layer reports (svd, exact) and the per-layer residuals (exact).
    """
    sent = sorted(name for name in global_header if plan.sends(name))
    total = sum(a.weight for a in accepted)
    weights = [a.weight / total for a in accepted]
    result: dict[str, torch.Tensor] = {}
    reports: dict[str, aggregation.LayerReport] = {}
    residuals: dict[str, torch.Tensor] = {}
    if settings.strategy in ("median", "trimmed-mean"):
        trim = aggregation.trim_count(settings.trim_fraction, len(accepted)) if settings.strategy == "trimmed-mean" else 0
        for name in sent:
            values = [a.get(name) for a in accepted]
            result[name] = (
                aggregation.coordinate_median(values) if settings.strategy == "median"
                else aggregation.trimmed_mean(values, trim)
            )
        return result, reports, residuals
    a_cfg = recipe.adapter
    kind = adapter_kind(a_cfg.kind)
    scale = kind.scale(a_cfg.alpha, a_cfg.r)
    scales = [kind.scale(a_cfg.alpha, a_cfg.rank_for(a.update.manifest.client_id)) for a in accepted]
    layers = aggregation.lora_layers(sent)
    in_layers = {name for pair in layers.values() for name in pair}
    for layer, (a_name, b_name) in layers.items():
        factors = ((a.get(a_name), a.get(b_name), w, s) for a, w, s in zip(accepted, weights, scales))
        if settings.strategy == "svd":
            result[a_name], result[b_name], reports[layer] = aggregation.svd_layer(factors, a_cfg.r, scale)
        else:
            result[a_name], result[b_name], residuals[layer], reports[layer] = aggregation.exact_layer(factors, scale)
    for name in sent:
        if name not in in_layers:  # the head, when it is shared: a plain weighted mean
            result[name] = aggregation.weighted_mean(({name: a.get(name)}, w) for a, w in zip(accepted, weights))[name]
    return result, reports, residuals


# --------------------------------------------------------------------------------------------------------
# evaluate


def load_for_evaluation(
    global_dir: Path,
    state_dir: Path | None = None,
    client_id: str | None = None,
    base_override: str | None = None,
    bench: Workbench | None = None,
) -> tuple[Workbench, GlobalManifest]:
    """A workbench holding the global model, or one client's: the global at the client's rank plus its kept
    tensors, when ``state_dir`` is given."""
    ckpt = checkpoint.read_global(global_dir)
    manifest = ckpt.manifest
    plan = plan_of(manifest)
    tensors = _verified_tensors(ckpt)
    correction = _verified_correction(ckpt)
    state = None
    rank = None
    if state_dir is not None:
        if not Path(state_dir).is_dir():
            raise FedloraError(f"client state not found: {state_dir}")
        state = checkpoint.latest_state(state_dir, before_round=manifest.round + 1)
        if state is None:
            raise FedloraError(f"client state {state_dir} holds no trained round up to round {manifest.round}")
        _check_state(state, client_id or state.manifest.client_id, manifest)
        rank = recipe_of(manifest).adapter.rank_for(state.manifest.client_id)
    bench = _bench_for(manifest, base_override, bench, rank)
    _load_client_model(bench, plan, tensors, state, correction)
    bench.model.eval()
    return bench, manifest


def evaluate(
    global_dir: Path,
    test: Path | None = None,
    state_dir: Path | None = None,
    client_id: str | None = None,
    base_override: str | None = None,
    bench: Workbench | None = None,
    examples: Examples | PromptResponses | None = None,
    progress: Callable[[int, int], None] | None = None,
    settings: recipes.EvaluationSection | None = None,
) -> dict[str, Any]:
    """The task's metrics (:mod:`fedlora_cli.evaluation`) of the global model, or of one client's personalised
    model. ``settings`` replaces the recipe's evaluation section (e.g. another ``max_new_tokens``)."""
    from fedlora_cli import evaluation
    from fedlora_cli.data import read_examples

    bench, manifest = load_for_evaluation(global_dir, state_dir, client_id, base_override, bench)
    if settings is not None:
        bench.recipe = dataclasses.replace(bench.recipe, evaluation=settings)
    recipe = bench.recipe
    if examples is None:
        if test is None:
            raise FedloraError("no test data given")
        examples = read_examples(test_path(test), recipe.data, recipe.model.task, manifest.num_labels)
    metrics = evaluation.evaluate(bench, examples, progress)
    return {"round": manifest.round, "personalised": state_dir is not None, "task": recipe.model.task, **metrics}


def test_path(path: Path) -> Path:
    """A test Parquet file, or a partition folder (whose test split is used)."""
    from fedlora_cli.partition import TEST_SHARD

    path = Path(path)
    return path / TEST_SHARD if path.is_dir() else path
