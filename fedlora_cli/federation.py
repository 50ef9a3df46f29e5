"""The federated workflow as importable functions: init, train a client, aggregate a round, evaluate.

Each function reads and writes the on-disk folders of :mod:`fedlora_cli.checkpoint`, so the same calls serve
a federation run by hand across machines and one scripted on a single machine (:mod:`fedlora_cli.simulate`).
A round ``t`` takes global checkpoint ``t-1`` to client updates of round ``t`` to global checkpoint ``t``.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedlora_cli import aggregation, checkpoint, privacy, recipe as recipes
from fedlora_cli.checkpoint import GlobalCheckpoint, GlobalManifest, StateManifest, UpdateManifest
from fedlora_cli.errors import FedloraError
from fedlora_cli.methods import Plan, plan as make_plan, role_of
from fedlora_cli.modeling import Workbench, build

if TYPE_CHECKING:
    import torch

    from fedlora_cli.data import Examples
    from fedlora_cli.training import DPSettings


def plan_of(manifest: GlobalManifest) -> Plan:
    return make_plan(manifest.method, manifest.head)


def recipe_of(manifest: GlobalManifest) -> recipes.Recipe:
    return recipes.from_dict(manifest.recipe)


def digests(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    return {name: checkpoint.tensor_digest(t) for name, t in tensors.items()}


def frozen_digest(plan: Plan, tensor_digests: dict[str, str]) -> str | None:
    """One digest over every tensor no client may change (FFA's A, a frozen head); None if there are none."""
    frozen = {name: d for name, d in tensor_digests.items() if role_of(name) in plan.frozen}
    return checkpoint.combined_digest(frozen) if frozen else None


def _bench_for(manifest: GlobalManifest, base_override: str | None, bench: Workbench | None) -> Workbench:
    if bench is None:
        bench = build(recipe_of(manifest), manifest.num_labels, base_override)
    if bench.fingerprint != manifest.base_fingerprint:
        raise FedloraError(
            f"base model '{bench.base_location}' is not the one this federation started from "
            f"(fingerprint {bench.fingerprint}, global checkpoint expects {manifest.base_fingerprint})"
        )
    # The global checkpoint's recipe governs (it carries the calibrated DP noise, for one).
    bench.recipe = recipe_of(manifest)
    return bench


def _load_client_model(
    bench: Workbench, plan: Plan, global_tensors: dict[str, torch.Tensor], state: checkpoint.ClientState | None
) -> None:
    """The client's model: the global adapter, overlaid with the tensors the client keeps (FedSA's B, a local head)."""
    bench.load_adapter_tensors(global_tensors)
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
    label_names = partition["label_names"] if partition is not None else None
    num_labels = recipe.model.num_labels or (len(label_names) if label_names else None)
    if num_labels is None:
        raise FedloraError("the number of labels is unknown: set model.num_labels or pass a partition folder")
    if label_names is not None and len(label_names) != num_labels:
        raise FedloraError(f"model.num_labels is {num_labels} but the partition has {len(label_names)} labels")
    out = Path(out)
    if out.exists() and not overwrite:
        raise FedloraError(f"{out} already exists (pass --overwrite to replace it)")
    recipe = calibrated(recipe, partition)
    if bench is None:
        bench = build(recipe, num_labels, base_override)
    plan = make_plan(recipe.federation.method, recipe.federation.head)
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
        digest=checkpoint.combined_digest(tensor_digests),
        frozen_digest=frozen_digest(plan, tensor_digests),
    )
    return checkpoint.write_global(out, manifest, tensors, bench.adapter_config(), overwrite=overwrite)


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
    return dataclasses.replace(recipe, privacy=dataclasses.replace(p, noise_multiplier=round(sigma, 6)))


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
    from fedlora_cli.data import read_shard
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
    examples = read_shard(shard, recipe.data.text_column, recipe.data.label_column, manifest.num_labels)
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
    bench = _bench_for(manifest, base_override, bench)

    ledger, dp = _privacy_for_round(recipe, newest, len(examples), client_id)

    _load_client_model(bench, plan, global_tensors, state)
    result = local_train(bench, plan, examples, round_seed(recipe.training.seed, client_id, round_), progress, dp)
    if ledger is not None:
        ledger.history.append((dp.noise_multiplier, dp.sample_rate, result.steps))

    tensors = bench.adapter_tensors()
    tensor_digests = digests(tensors)
    if frozen_digest(plan, tensor_digests) != manifest.frozen_digest:
        raise FedloraError("a frozen adapter tensor changed during training; nothing written")
    sent = {name: t for name, t in tensors.items() if plan.sends(name)}
    kept = {name: t for name, t in tensors.items() if plan.keeps(name)}
    bad = aggregation.nonfinite(sent) or aggregation.nonfinite(kept)
    if bad is not None:
        raise FedloraError(f"training diverged: tensor '{bad}' holds NaN or Inf (lower training.lr); nothing written")
    update_manifest = UpdateManifest(
        client_id=client_id,
        round=round_,
        parent_digest=manifest.digest,
        method=manifest.method,
        recipe_digest=manifest.recipe_digest,
        base_fingerprint=manifest.base_fingerprint,
        frozen_digest=manifest.frozen_digest,
        num_examples=result.num_examples,
        shard_examples=len(examples),
        steps=result.steps,
        loss=result.loss,
        seconds=round(result.seconds, 3),
        bytes=0,
        tensor_digests={name: tensor_digests[name] for name in sent},
        privacy=None if ledger is None else {k: v for k, v in ledger.to_dict().items() if k != "history"},
    )
    update = checkpoint.write_update(out, update_manifest, sent, overwrite=overwrite)
    state_manifest = StateManifest(
        client_id=client_id,
        round=round_,
        parent_digest=manifest.digest,
        recipe_digest=manifest.recipe_digest,
        tensor_digests={name: tensor_digests[name] for name in kept},
        privacy=None if ledger is None else ledger.to_dict(),
    )
    checkpoint.write_state(Path(state_dir), state_manifest, kept)
    return update


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
    update_norm: float
    bytes: int
    loss: float


@dataclass
class AggregateResult:
    checkpoint: GlobalCheckpoint
    clients: list[ClientRow] = field(default_factory=list)
    server_epsilon: float | None = None  # DP-FedAvg: client-level epsilon after this round


def _validate_update(update: checkpoint.ClientUpdate, manifest: GlobalManifest, expected: dict[str, Any]) -> None:
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
        raise FedloraError(f"client update {where} was trained with a different frozen A (frozen digest differs)")
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


def aggregate_round(
    global_dir: Path,
    update_dirs: Sequence[Path],
    out: Path,
    weighting: str | None = None,
    server_privacy: recipes.ServerPrivacySection | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
    noise_seed: int | None = None,
) -> AggregateResult:
    """Validate every client update against the global checkpoint, average the sent tensors, write round t.

    ``weighting`` (default: the recipe's ``federation.weighting``) is 'examples', 'shard' or 'uniform'.
    ``server_privacy`` (default: the recipe's) turns on DP-FedAvg: clipped, equally weighted, noised.
    """
    ckpt = checkpoint.read_global(global_dir)
    manifest = ckpt.manifest
    plan = plan_of(manifest)
    out = Path(out)
    if out.exists() and not overwrite:
        raise FedloraError(f"{out} already exists (pass --overwrite to replace it)")
    if not update_dirs:
        raise FedloraError("no client updates given")
    global_header = checkpoint.tensor_header(ckpt.weights_path, "global checkpoint weights")
    expected = {name: spec for name, spec in global_header.items() if plan.sends(name)}
    updates = [checkpoint.read_update(Path(p)) for p in update_dirs]
    seen: dict[str, Path] = {}
    for update in updates:
        if update.manifest.client_id in seen:
            raise FedloraError(
                f"client '{update.manifest.client_id}' appears twice ({seen[update.manifest.client_id]} and {update.path})"
            )
        seen[update.manifest.client_id] = update.path
        _validate_update(update, manifest, expected)
    weighting = weighting or recipe_of(manifest).federation.weighting
    if weighting not in recipes.WEIGHTINGS:
        raise FedloraError(f"weighting must be one of {', '.join(recipes.WEIGHTINGS)}; got '{weighting}'")
    counts = [u.manifest.shard_examples if weighting == "shard" else u.manifest.num_examples for u in updates]
    weights = aggregation.client_weights(counts, uniform=weighting == "uniform")
    global_tensors = _verified_tensors(ckpt)
    rows: list[ClientRow] = []

    def stream() -> Iterator[tuple[dict[str, torch.Tensor], float]]:
        for i, (update, tensors, weight) in enumerate(_checked_updates(updates, weights), start=1):
            rows.append(
                ClientRow(
                    update.manifest.client_id,
                    update.manifest.num_examples,
                    update.manifest.shard_examples,
                    weight,
                    aggregation.update_norm(tensors, global_tensors),
                    update.tensors_path.stat().st_size,
                    update.manifest.loss,
                )
            )
            yield tensors, weight
            if progress is not None:
                progress(i, len(updates))

    server_privacy = server_privacy or recipe_of(manifest).server_privacy
    server_ledger = [list(e) for e in manifest.server_privacy_ledger]
    if server_privacy is None:
        averaged = aggregation.weighted_mean(stream())
    else:
        sp = server_privacy
        # Every client takes part in every round: sample rate 1 over the federation's clients.
        server_ledger.append([sp.noise_multiplier, 1.0, 1])
        spent = privacy.epsilon([tuple(e) for e in server_ledger], sp.delta, "rdp")
        if sp.target_epsilon is not None and spent > sp.target_epsilon:
            raise FedloraError(
                f"server privacy budget: this round would bring client-level epsilon to {spent:.3f}, "
                f"over server_privacy.target_epsilon {sp.target_epsilon:g}; nothing written"
            )
        reference = {name: global_tensors[name] for name in expected}
        seed = noise_seed if noise_seed is not None else secrets.randbits(63)
        averaged = privacy.dp_fedavg(stream(), reference, sp.clip_norm, sp.noise_multiplier, len(updates), seed)
    new_tensors = {**global_tensors, **averaged}
    tensor_digests = digests(new_tensors)
    new_manifest = GlobalManifest(
        **{
            **{k: getattr(manifest, k) for k in GlobalManifest.__dataclass_fields__},
            "round": manifest.round + 1,
            "tensor_digests": tensor_digests,
            "digest": checkpoint.combined_digest(tensor_digests),
            "frozen_digest": frozen_digest(plan, tensor_digests),
            "clients": [u.manifest.client_id for u in updates],
            "server_privacy_ledger": server_ledger,
            "created": time.time(),
        }
    )
    if new_manifest.frozen_digest != manifest.frozen_digest:
        raise FedloraError("aggregation changed a frozen tensor; nothing written")
    adapter_config = checkpoint.read_json(ckpt.path / checkpoint.ADAPTER_CONFIG, "adapter config")
    written = checkpoint.write_global(out, new_manifest, new_tensors, adapter_config, overwrite=overwrite)
    server_epsilon = None if server_privacy is None else spent
    return AggregateResult(written, rows, server_epsilon)


# --------------------------------------------------------------------------------------------------------
# evaluate


def load_for_evaluation(
    global_dir: Path,
    state_dir: Path | None = None,
    client_id: str | None = None,
    base_override: str | None = None,
    bench: Workbench | None = None,
) -> tuple[Workbench, GlobalManifest]:
    """A workbench holding the global adapter, plus one client's kept tensors when ``state_dir`` is given."""
    ckpt = checkpoint.read_global(global_dir)
    manifest = ckpt.manifest
    plan = plan_of(manifest)
    tensors = _verified_tensors(ckpt)
    state = None
    if state_dir is not None:
        if not Path(state_dir).is_dir():
            raise FedloraError(f"client state not found: {state_dir}")
        state = checkpoint.latest_state(state_dir, before_round=manifest.round + 1)
        if state is None:
            raise FedloraError(f"client state {state_dir} holds no trained round up to round {manifest.round}")
        _check_state(state, client_id or state.manifest.client_id, manifest)
    bench = _bench_for(manifest, base_override, bench)
    _load_client_model(bench, plan, tensors, state)
    bench.model.eval()
    return bench, manifest


def evaluate(
    global_dir: Path,
    test: Path | None = None,
    state_dir: Path | None = None,
    client_id: str | None = None,
    base_override: str | None = None,
    bench: Workbench | None = None,
    examples: Examples | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Accuracy, macro-F1 and loss of the global model, or of one client's personalised model."""
    from fedlora_cli import evaluation
    from fedlora_cli.data import read_shard

    bench, manifest = load_for_evaluation(global_dir, state_dir, client_id, base_override, bench)
    if examples is None:
        if test is None:
            raise FedloraError("no test data given")
        recipe = bench.recipe
        examples = read_shard(test_path(test), recipe.data.text_column, recipe.data.label_column, manifest.num_labels)
    metrics = evaluation.evaluate(bench, examples, progress)
    return {"round": manifest.round, "personalised": state_dir is not None, **metrics}


def test_path(path: Path) -> Path:
    """A test Parquet file, or a partition folder (whose test split is used)."""
    from fedlora_cli.partition import TEST_SHARD

    path = Path(path)
    return path / TEST_SHARD if path.is_dir() else path
