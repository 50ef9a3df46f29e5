"""The coordinator's round, as a short pipeline: read the client updates, validate them against the global
checkpoint, screen them (the norm bound), aggregate them with the recipe's strategy (wrapped by DP-FedAvg under
server privacy), build the next global manifest, commit (the DP-FedAvg ledger), write the next global checkpoint.

Every strategy runs on numpy, and the round never imports torch. Tensor files are read through one reader
(:mod:`fedlora_cli.storage.mapped`); bfloat16 and float16 tensors are widened to float32 exactly, aggregated, and
the results rounded back to the global checkpoint's dtype when they are written. The weighted mean (``mean``,
also under a server optimiser) screens and averages each mapped update in one pass (:mod:`.numpy_round`). The
others receive the updates screened one at a time, each checked in full (digests, finite values); DP-FedAvg
streams them, and the layer-wise strategies (svd, exact, median, trimmed-mean) then read the tensors back one
layer (svd, exact) or one tensor name (median, trimmed-mean) at a time, re-checking each tensor's digest.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict, Unpack

from fedlora_cli import aggregation, recipe as recipes, storage
from fedlora_cli.adapters.roles import ROLE_PROJECTION, role_of
from fedlora_cli.aggregation import (
    SERVER_OPTIMIZERS, Aggregate, Contributions, NormBound, RoundSpec, Strategy, make_strategy,
)
from fedlora_cli.aggregation.norm_bound import CLIPPED, REJECTED
from fedlora_cli.errors import FedloraError
from fedlora_cli.federation import numpy_round
from fedlora_cli.federation.secure import MANIFEST_KEY, SecureSum, refuse_in_the_clear, site_bound
from fedlora_cli.federation.common import (
    Global, digests, frozen_digest, frozen_labels, next_digests, received_tensors,
)
from fedlora_cli.federation.sampling import (
    asked as sampled_clients, fewest, fewest_named, needed, require_asked, require_enough, sample_rate,
)
from fedlora_cli.privacy.dp_fedavg import DPFedAvg
from fedlora_cli.privacy.ledgers import coordinator_ledger
from fedlora_cli.storage import encoding as encodings
from fedlora_cli.storage.manifests import GlobalManifest
from fedlora_cli.storage.mapped import Layout, narrow, read_layout, widen

import numpy as np


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
class AggregateResult:
    checkpoint: Global
    clients: list[ClientRow] = field(default_factory=list)
    server_epsilon: float | None = None  # DP-FedAvg: client-level epsilon after this round
    server_ledger: Path | None = None  # DP-FedAvg: the coordinator's ledger this round was recorded in
    strategy: str = "mean"
    # svd / exact: per adapted layer, how far plain averaging of A and B would have been from the exact product.
    layers: dict[str, aggregation.LayerReport] = field(default_factory=dict)


class RoundOverrides(TypedDict, total=False):
    """Settings of one round that replace the recipe's (``fedlora aggregate`` options); None keeps the recipe's."""

    weighting: str | None  # federation.weighting: 'examples', 'shard' or 'uniform'
    strategy: str | None  # federation.aggregation
    trim_fraction: float | None  # federation.trim_fraction
    norm_bound: float | None  # federation.norm_bound
    norm_bound_action: str | None  # federation.norm_bound_action
    server_privacy: recipes.ServerPrivacySection | None  # turns on DP-FedAvg (default: the recipe's section)


# The recipe key each override replaces, and how a message names it.
_OVERRIDDEN = {
    "weighting": ("federation.weighting", "weighting"),
    "strategy": ("federation.aggregation", "aggregation strategy"),
    "trim_fraction": ("federation.trim_fraction", "trim fraction"),
    "norm_bound": ("federation.norm_bound", "norm bound"),
    "norm_bound_action": ("federation.norm_bound_action", "norm bound action"),
    "server_privacy": ("server_privacy", "server privacy"),
}
_SERVER_PRIVACY_LABELS = {
    "server_privacy.clip_norm": "--dp-clip", "server_privacy.noise_multiplier": "--dp-noise",
    "server_privacy.delta": "--dp-delta",
}


def aggregate_round(
    global_checkpoint: Path | Global,
    update_dirs: Sequence[Path],
    out: Path,
    *,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
    noise_seed: int | None = None,
    server_ledger: Path | None = None,
    **overrides: Unpack[RoundOverrides],
) -> AggregateResult:
    """Validate every client update against the global checkpoint, combine the sent tensors, write round t.

    ``overrides`` replace the recipe's settings for this round (:class:`RoundOverrides`) and are validated by
    the recipe's own rules. At least ``federation.min_clients`` updates are needed; when the federation
    samples its clients, only from clients this round asked (:mod:`fedlora_cli.federation.sampling`). Under DP-FedAvg (``server_privacy``, or the recipe's) the spending is checked
    against, and recorded in, the coordinator's ledger (``server_ledger``; default: the one beside the global
    checkpoint, see :func:`fedlora_cli.privacy.ledgers.coordinator_ledger`) before the checkpoint is written.
    """
    g = Global.of(global_checkpoint)
    out = Path(out)
    if update_dirs:  # a skipped round or a noise-only release carries no update, in the clear or otherwise
        refuse_in_the_clear(g.recipe, "to aggregate them by hand")
    if out.exists() and not overwrite:
        raise FedloraError(f"{out} already exists (pass --overwrite to replace it)")
    recipe = round_recipe(g.recipe, overrides)
    f, round_ = recipe.federation, g.manifest.round + 1
    asked = sampled_clients(f, recipe.training.seed, round_)
    need = needed(f, len(asked), recipe.server_privacy is not None)
    if need is None:
        return _skip_round(g, recipe, asked, update_dirs, out, overwrite)
    if not update_dirs and need > 0:
        raise FedloraError("no client updates given")
    strategy = round_strategy(recipe, g, out, server_ledger, noise_seed)
    updates = read_updates(g, recipe, update_dirs)
    _check_participation(g, recipe, updates, need)
    strategy.check_count(len(updates), "trim fraction")
    counts = [u.manifest.shard_examples if f.weighting == "shard" else u.manifest.num_examples for u in updates]
    weights = aggregation.client_weights(counts, uniform=f.weighting == "uniform") if updates else []
    strategy.check_round(len(updates))
    screen = _Screen(g, recipe, NormBound(f.norm_bound, f.norm_bound_action), progress, len(updates))
    result = strategy.aggregate(_RoundContributions(screen, updates, weights), _round_spec(g, screen))
    return _write_next(g, recipe, result, strategy, out, overwrite, _report(strategy, screen, result),
                       [u.manifest.client_id for u in updates], screen.rows)


def aggregate_secure(global_checkpoint: Path | Global, secure: SecureSum, out: Path, *,
                     noise_seed: int | None = None) -> AggregateResult:
    """Round t from the unmasked weighted mean of the sites' differences (:mod:`.secure`): the coordinator never
    held one update. The sum is checked (:meth:`SecureSum.check`), then goes through the same steps as
    :func:`aggregate_round`'s mean: DP-FedAvg's noise (the sites clipped; the sum of their differences is divided
    by the fixed m), the server optimiser, the next manifest, the coordinator's ledger."""
    g = Global.of(global_checkpoint)
    out = Path(out)
    if out.exists():
        raise FedloraError(f"{out} already exists; nothing written")
    recipe = g.recipe
    f, round_ = recipe.federation, g.manifest.round + 1
    need = needed(f, len(sampled_clients(f, recipe.training.seed, round_)), recipe.server_privacy is not None)
    require_enough(f, round_, len(secure.weights), stage="given", need=need or 1)
    for cid in secure.clients:
        require_asked(f, recipe.training.seed, round_, cid, "of the secure sum")
    sent = sorted(name for name in g.header if g.plan.sends(name))
    secure.check(g, site_bound(recipe, sum(secure.mean[n].size for n in sent)))
    strategy = round_strategy(recipe, g, out, None, noise_seed)
    strategy.check_round(len(secure.weights))
    reference = {name: widen(g.verified_arrays[name]) for name in sent}
    # One contribution: the global moved by the mean (or, under DP-FedAvg, by the sum the fixed m divides).
    moved = secure.delta_sum() if recipe.server_privacy is not None else secure.mean
    summed = {n: (reference[n].astype(np.float64) + moved[n]).astype(reference[n].dtype) for n in sent}
    contributions = Contributions([(_Summed(summed), True)])
    a = recipe.adapter
    result = strategy.aggregate(contributions, RoundSpec(sent, g.plan.kind, a.alpha, a.r, a.rank_for, reference))
    report = {**strategy.describe(), MANIFEST_KEY: secure.describe()}
    return _write_next(g, recipe, result, strategy, out, False, report, secure.clients, [])


@dataclass
class _Summed:
    """The secure round's one contribution: the global moved by what the sites sent, summed."""

    tensors: Mapping[str, np.ndarray] | None
    weight: float = 1.0
    client_id: str = "secure-sum"

    def get(self, name: str) -> np.ndarray:
        raise FedloraError("a securely aggregated round has no single update to read back")


def _write_next(g: Global, recipe: recipes.Recipe, result: Aggregate, strategy: Strategy, out: Path, overwrite: bool,
                report: dict[str, Any], clients: list[str], rows: list[ClientRow]) -> AggregateResult:
    """Build the next global manifest, commit the strategy's release, write the global checkpoint."""
    manifest, tensors, correction = _next_global(g, recipe, result, strategy, report, clients)
    adapter_config = storage.read_json(g.path / storage.ADAPTER_CONFIG, "adapter config")
    strategy.commit()
    written = storage.write_global(out, manifest, tensors, adapter_config, overwrite=overwrite, correction=correction,
                                   server_state=result.server_state)
    release = strategy.privacy
    return AggregateResult(Global.written(written, g.recipe, tensors, correction, result.server_state), rows,
                           None if release is None else release.epsilon, None if release is None else release.ledger,
                           manifest.aggregation["strategy"], result.layers)


def round_recipe(recipe: recipes.Recipe, overrides: Mapping[str, Any]) -> recipes.Recipe:
    """The recipe with this round's overrides (:func:`fedlora_cli.recipe.override`), checked by the same validation
    as the recipe itself; the trim count is left to the updates that arrive."""
    unknown = sorted(set(overrides) - set(_OVERRIDDEN))
    if unknown:
        raise TypeError(f"aggregate_round() got unknown override '{unknown[0]}'")
    server_privacy = overrides.get("server_privacy")
    if server_privacy is not None and recipe.server_privacy is not None and server_privacy.target_epsilon is None:
        # A budget in the recipe binds DP-FedAvg asked for on the command line too.
        server_privacy = dataclasses.replace(server_privacy, target_epsilon=recipe.server_privacy.target_epsilon)
    values = {_OVERRIDDEN[name][0]: value for name, value in {**overrides, "server_privacy": server_privacy}.items()}
    labels = {**dict(_OVERRIDDEN.values()), **_SERVER_PRIVACY_LABELS}
    return recipes.override(recipe, values, labels, planned_clients=False)


def round_strategy(recipe: recipes.Recipe, g: Global, out: Path, server_ledger: Path | None,
                   noise_seed: int | None) -> Strategy:
    """The recipe's strategy, wrapped by DP-FedAvg (with the coordinator's ledger) under server privacy, and by
    the server optimiser (continuing from the global checkpoint's state) if there is one."""
    f = recipe.federation
    strategy = make_strategy(f)
    sp = recipe.server_privacy
    if sp is not None:
        ledger = coordinator_ledger(g, server_ledger)
        release = {"round": g.manifest.round + 1, "parent_digest": g.manifest.digest, "out": str(out.resolve())}
        seed = noise_seed if noise_seed is not None else secrets.randbits(63)
        q = sample_rate(f)
        strategy = DPFedAvg(inner=strategy, settings=sp, ledger=ledger, num_clients=f.clients_per_round or f.clients,
                            seed=seed, release=release, sample_rate=q, population=f.clients,
                            clipped_at_sites=f.secure_aggregation is not None)
    if f.server_optimizer in SERVER_OPTIMIZERS:
        strategy = SERVER_OPTIMIZERS[f.server_optimizer].around(strategy, f, g.verified_server_state)
    return strategy


def _skip_round(g: Global, recipe: recipes.Recipe, asked: list[str], update_dirs: Sequence[Path], out: Path,
                overwrite: bool) -> AggregateResult:
    """A round whose seeded sample asked fewer than ``federation.min_clients`` (:func:`.sampling.needed`): the
    parent's tensors, correction and server state carried forward as the round's global checkpoint, recorded as
    skipped (no client, no release), so the federation goes on at the next round instead of stalling."""
    f, round_ = recipe.federation, g.manifest.round + 1
    if update_dirs:
        raise FedloraError(
            f"round {round_} is skipped: its sample asked {len(asked)} client(s), fewer than {fewest_named(f)}; "
            "give no client updates to carry the global checkpoint forward; nothing written"
        )
    tensors, correction, state = g.verified_arrays, g.verified_correction_arrays, g.verified_server_state
    manifest = dataclasses.replace(
        g.manifest, round=round_, clients=[], asked=asked, created=time.time(),
        # the recipe's min_clients under its own name; the minimum the round applied (under secure aggregation at
        # least reconstruction_threshold) under another
        aggregation={"strategy": SKIPPED, "asked": len(asked), "min_clients": f.min_clients, "fewest": fewest(f)},
    )
    adapter_config = storage.read_json(g.path / storage.ADAPTER_CONFIG, "adapter config")
    written = storage.write_global(out, manifest, tensors, adapter_config, overwrite=overwrite, correction=correction,
                                   server_state=state)
    return AggregateResult(Global.written(written, g.recipe, tensors, correction, state), [], strategy=SKIPPED)


# The aggregation a skipped round records (its global is its parent's, carried forward).
SKIPPED = "skipped"


def _check_participation(g: Global, recipe: recipes.Recipe, updates: Sequence[storage.ClientUpdate],
                         need: int) -> None:
    """The participation rule (:mod:`.sampling`): enough updates, and only from clients of the federation that
    this round asked."""
    f, round_ = recipe.federation, g.manifest.round + 1
    require_enough(f, round_, len(updates), stage="given", need=need)
    for update in updates:
        require_asked(f, recipe.training.seed, round_, update.manifest.client_id, update.path)


def read_updates(g: Global, recipe: recipes.Recipe, update_dirs: Sequence[Path]) -> list[storage.ClientUpdate]:
    """Every client update's manifest and tensor header, validated against the global checkpoint."""
    header = g.header
    updates = [storage.read_update(Path(p)) for p in update_dirs]
    seen: dict[str, Path] = {}
    for update in updates:
        client_id = update.manifest.client_id
        if client_id in seen:
            raise FedloraError(f"client '{client_id}' appears twice ({seen[client_id]} and {update.path})")
        seen[client_id] = update.path
        _validate_update(update, g, _expected_tensors(header, g, recipe.adapter.rank_for(client_id)))
    return updates


def check_update(global_checkpoint: Path | Global, update_dir: Path) -> storage.ClientUpdate:
    """One client update checked in full against the global checkpoint, as :func:`aggregate_round` checks each:
    its manifest, its tensors' names, dtypes and shapes, finite values and digests.

    For a coordinator that receives updates one at a time (the Flower server app), so a bad one is refused by name
    while the round goes on with the others.
    """
    g = Global.of(global_checkpoint)
    (update,) = read_updates(g, g.recipe, [update_dir])
    received = None
    if update.manifest.encoding != encodings.RAW:
        reference = {name: widen(t) for name, t in g.verified_arrays.items()}
        received = received_tensors(g.recipe, reference, g.recipe.adapter.rank_for(update.manifest.client_id))
    _load_checked(update, received)
    return update


def _expected_tensors(
    header: dict[str, tuple[str, tuple[int, ...]]], g: Global, rank: int
) -> dict[str, tuple[str, tuple[int, ...]]]:
    """dtype and shape of every tensor a client of LoRA rank ``rank`` must send: the global's, at its rank."""
    kind = g.plan.kind
    expected = {}
    for name, (dtype, shape) in header.items():
        if not g.plan.sends(name):
            continue
        axis = kind.rank_axis(role_of(name))
        if axis is not None:
            shape = (*shape[:axis], rank, *shape[axis + 1:])
        expected[name] = (dtype, shape)
    return expected


def _validate_update(update: storage.ClientUpdate, g: Global, expected: dict[str, Any]) -> None:
    m, where, manifest, plan = update.manifest, update.path, g.manifest, g.plan
    encoding = g.recipe.federation.update_encoding
    if m.encoding != encoding:
        raise FedloraError(f"client update {where} is encoded '{m.encoding}'; the federation's recipe sends "
                           f"'{encoding}' (federation.update_encoding)")
    expected = encodings.stored_header(expected, encoding)
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
    header = storage.tensor_header(update.tensors_path, "client update tensors")
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
    for name, digest in m.tensor_digests.items():  # an unknown algorithm is refused before any update is read
        storage.digest_algorithm(digest, f"client update {where}: tensor '{name}'")


def _load_checked(update: storage.ClientUpdate,
                  received: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """A client update's tensors (widened to float32 or float64; an encoded update decoded onto what the client
    ``received``), refused if any stored tensor does not match its manifest's digest or any is not finite."""
    read = storage.load_verified(update.tensors_path, update.manifest.tensor_digests, "client update tensors",
                                 framework="numpy")
    if update.manifest.encoding != encodings.RAW:
        read = encodings.decode_update(read, update.manifest.encoding, received)
    tensors = {name: widen(t) for name, t in read.items()}
    bad = aggregation.nonfinite(tensors)
    if bad is not None:
        raise FedloraError(f"client update {update.path}: tensor '{bad}' holds NaN or Inf")
    return tensors


def _checked_updates(
    updates: Sequence[storage.ClientUpdate], weights: Sequence[float],
    received: Callable[[storage.ClientUpdate], Mapping[str, np.ndarray]],
) -> Iterator[tuple[storage.ClientUpdate, dict[str, np.ndarray], float]]:
    """Each update's tensors, read and checked (finite, digests) before they are yielded.

    The next update is read and checked on a second thread while the caller works on this one (hashing and
    file reads release the GIL), so at most two client updates are in memory at once.
    """
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(_load_checked, updates[0], received(updates[0]))
        for i, (update, weight) in enumerate(zip(updates, weights)):
            tensors = pending.result()
            if i + 1 < len(updates):
                pending = pool.submit(_load_checked, updates[i + 1], received(updates[i + 1]))
            yield update, tensors, weight
            del tensors


@dataclass(kw_only=True)
class _Contribution:
    """A client update in the round (see :class:`fedlora_cli.aggregation.Contribution`), read back by name."""

    update: storage.ClientUpdate
    weight: float
    clip: float  # the norm bound's scale of its difference from ``reference`` (1: untouched)
    # What the client received, kept only when clipping or decoding (an encoded update) needs it.
    reference: Mapping[str, np.ndarray] | None
    tensors: Mapping[str, np.ndarray] | None
    layout: Layout | None = None  # the update's file, parsed on the first read back

    @property
    def client_id(self) -> str:
        return self.update.manifest.client_id

    def get(self, name: str) -> np.ndarray:
        if self.layout is None:
            self.layout = read_layout(self.update.tensors_path, "client update tensors")
        encoding = self.update.manifest.encoding
        stored = {}
        for part in encodings.parts_of(name, encoding):
            t = self.layout.read(part) if part in self.layout.entries else None
            # Checked again as it is read: the file must still be the one screened in the first pass.
            if t is None or not storage.digest_matches(t, self.update.manifest.tensor_digests[part]):
                raise FedloraError(f"client update {self.update.path}: tensor '{part}' changed while aggregating")
            stored[part] = t
        t = widen(stored[name] if encoding == encodings.RAW else
                  encodings.decode_update(stored, encoding, {name: self.reference[name]})[name])
        if self.clip != 1.0:
            ref = self.reference[name]
            t = ref + (t - ref) * t.dtype.type(self.clip)
        return t


class _RoundContributions(Contributions):
    """The round's client updates as a strategy receives them: screened one at a time (:meth:`_Screen.items`),
    or for the weighted mean screened and averaged in one pass over the mapped files (:mod:`.numpy_round`)."""

    def __init__(self, screen: _Screen, updates: Sequence[storage.ClientUpdate], weights: Sequence[float]) -> None:
        super().__init__(screen.items(updates, weights))
        self._screen, self._updates, self._weights = screen, updates, weights

    def weighted_mean(self) -> dict[str, np.ndarray]:
        """Every client trains the global rank here (only svd mixes ranks), so each received the global."""
        screen = self._screen
        expected = _expected_tensors(screen.g.header, screen.g, screen.recipe.adapter.r)
        reference = {name: screen.reference[name] for name in expected}
        averaged = numpy_round.weighted_mean(self._updates, self._weights, reference, expected, screen.bound,
                                             screen.record)
        screen.finish()
        return averaged


class _Screen:
    """Reads each client update in turn (checked in full), measures how far it moved from what the client
    received, applies the norm bound, and keeps a :class:`ClientRow` for each (of ``total`` updates).

    The numpy mean round (:mod:`.numpy_round`) screens by itself and hands its verdicts to :meth:`record`.
    """

    def __init__(self, g: Global, recipe: recipes.Recipe, bound: NormBound,
                 progress: Callable[[int, int], None] | None, total: int) -> None:
        self.g, self.recipe, self.bound, self.progress, self.total = g, recipe, bound, progress, total
        self.rows: list[ClientRow] = []
        # The global's tensors widened as the updates are: what a client of the global rank received.
        self.reference = {name: widen(t) for name, t in g.verified_arrays.items()}
        self._by_rank: dict[int, dict[str, np.ndarray]] = {}

    def items(self, updates: Sequence[storage.ClientUpdate],
              weights: Sequence[float]) -> Iterator[tuple[_Contribution, bool]]:
        if not updates:  # a DP-FedAvg round whose sample asked nobody: a noise-only release
            return
        for update, tensors, weight in _checked_updates(updates, weights, self._received):
            reference = self._received(update)
            verdict = self.bound.judge(tensors, reference)
            self.rows.append(self._row(update, weight, verdict))
            kept = self.bound.apply(tensors, reference, verdict)
            needed = verdict.bound == CLIPPED or update.manifest.encoding != encodings.RAW
            yield _Contribution(update=update, weight=weight, clip=verdict.clip, tensors=kept,
                                reference=reference if needed else None), verdict.bound != REJECTED
            self._advance()
        self.finish()

    def record(self, update: storage.ClientUpdate, weight: float, verdict: Any) -> None:
        """An update judged and averaged (or left out) elsewhere."""
        self.rows.append(self._row(update, weight, verdict))
        self._advance()

    def finish(self) -> None:
        """Refuse a round whose every update the norm bound rejected."""
        if self.rows and all(row.bound == REJECTED for row in self.rows):
            raise FedloraError(
                f"all {self.total} client updates exceed the norm bound {self.bound.bound:g} and were rejected; "
                "nothing written"
            )

    def _advance(self) -> None:
        if self.progress is not None:
            self.progress(len(self.rows), self.total)

    def _received(self, update: storage.ClientUpdate) -> dict[str, np.ndarray]:
        rank = self.recipe.adapter.rank_for(update.manifest.client_id)
        if rank not in self._by_rank:
            self._by_rank[rank] = received_tensors(self.recipe, self.reference, rank)
        received = self._by_rank[rank]
        return {name: received[name] for name in encodings.sent_names(update.manifest.tensor_digests,
                                                                       update.manifest.encoding)}

    def _row(self, update: storage.ClientUpdate, weight: float, verdict: Any) -> ClientRow:
        m = update.manifest
        rank = self.recipe.adapter.rank_for(m.client_id) if self.g.plan.kind.has_factors else None
        return ClientRow(m.client_id, m.num_examples, m.shard_examples, weight, verdict.norm,
                         update.tensors_path.stat().st_size, m.loss, rank, verdict.bound)


def _round_spec(g: Global, screen: _Screen) -> RoundSpec:
    sent = sorted(name for name in g.header if g.plan.sends(name))
    a = screen.recipe.adapter
    return RoundSpec(sent, g.plan.kind, a.alpha, a.r, a.rank_for, {name: screen.reference[name] for name in sent})


def _next_global(
    g: Global, recipe: recipes.Recipe, result: Aggregate, strategy: Strategy, report: dict[str, Any],
    clients: list[str],
) -> tuple[GlobalManifest, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The next global checkpoint's manifest, tensors (rounded to the global's dtypes) and base-weight
    correction."""
    parent, parent_correction = g.verified_arrays, g.verified_correction_arrays
    aggregated = {name: narrow(t, g.header[name][0]) for name, t in result.tensors.items()}
    bad = aggregation.nonfinite(aggregated)
    if bad is not None:
        cause = "the client updates" if recipe.federation.server_optimizer == "none" else \
            "the client updates or the server optimiser's step"
        raise FedloraError(f"the aggregate of tensor '{bad}' is not finite (overflow in {cause}); nothing written")
    correction = dict(parent_correction)
    for layer, residual in result.residuals.items():
        previous = correction.get(layer)
        correction[layer] = residual if previous is None else (previous.astype(residual.dtype) + residual)
    tensors = {**parent, **aggregated}
    tensor_digests = next_digests(tensors, parent, g.manifest.tensor_digests)
    correction_digests = next_digests(correction, parent_correction, g.manifest.correction_digests)
    state_digests = digests(result.server_state)
    release = strategy.privacy
    f = recipe.federation
    manifest = dataclasses.replace(
        g.manifest,
        round=g.manifest.round + 1,
        tensor_digests=tensor_digests,
        correction_digests=correction_digests,
        server_state_digests=state_digests,
        asked=None if f.clients_per_round is None else sampled_clients(f, recipe.training.seed, g.manifest.round + 1),
        digest=storage.global_digest(tensor_digests, correction_digests, state_digests),
        frozen_digest=frozen_digest(g.plan, tensor_digests),
        clients=list(clients),
        server_privacy_ledger=[list(e) for e in (g.manifest.server_privacy_ledger if release is None else release.history)],
        server_privacy_delta=g.manifest.server_privacy_delta if release is None else release.delta,
        aggregation=report,
        created=time.time(),
    )
    if manifest.frozen_digest != g.manifest.frozen_digest:
        raise FedloraError("aggregation changed a frozen tensor; nothing written")
    return manifest, tensors, correction


def _report(strategy: Strategy, screen: _Screen, result: Aggregate) -> dict[str, Any]:
    """How this round aggregated, as the global manifest records it."""
    described = strategy.describe()
    report = {"strategy": described.pop("strategy"), **screen.bound.describe(),
              "clipped": [r.client_id for r in screen.rows if r.bound == CLIPPED],
              "rejected": [r.client_id for r in screen.rows if r.bound == REJECTED], **described}
    if result.layers:
        report["layers"] = {layer: dataclasses.asdict(r) for layer, r in result.layers.items()}
    return report
