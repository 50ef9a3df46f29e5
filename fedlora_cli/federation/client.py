"""One client's round: train on its shard from the global checkpoint; write its client update (what the method
sends) and its client state (what it keeps, with its privacy ledger)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedlora_cli import aggregation, privacy, recipe as recipes, storage
from fedlora_cli.errors import FedloraError
from fedlora_cli.federation.common import (
    Global, bench_for, digests, frozen_labels, frozen_unchanged, load_client_model, received_tensors,
)
from fedlora_cli.federation.sampling import not_asked
from fedlora_cli.model.workbench import Workbench
from fedlora_cli.storage import encoding as encodings
from fedlora_cli.storage.manifests import GlobalManifest, StateManifest, UpdateManifest

if TYPE_CHECKING:
    import torch

    from fedlora_cli.model.training import DPSettings, TrainResult


@dataclass
class ClientRound:
    """What one client's round wrote: the client update it sends and the client state it keeps."""

    update: storage.ClientUpdate
    state: storage.ClientState
    # The update was made before from this very global checkpoint and is sent again, not trained again.
    resent: bool = False


def existing_update(out: Path, g: Global, client_id: str) -> storage.ClientUpdate | None:
    """The client update at ``out`` if it is ``client_id``'s, made from this very global checkpoint (same parent
    digest); None when there is none, it is unreadable, or it is stale (made from another parent).

    The one answer to "is this update already current?", for the coordinator resuming a round and for a site asked
    again for a round it has answered.
    """
    if not Path(out).is_dir():
        return None
    try:
        update = storage.read_update(Path(out))
    except FedloraError:
        return None
    m = update.manifest
    return update if m.parent_digest == g.manifest.digest and m.client_id == client_id else None


def site_round(
    global_checkpoint: Path | Global, data: Path | str | None, state_dir: Path, out: Path, client_id: str, *,
    resend: bool = True, overwrite: bool = True, no_data: str | None = None, **training: Any,
) -> ClientRound:
    """This client's update for the round after the global checkpoint: the one it already made from this very
    global (with ``resend``; sent again, not trained again, so a round asked twice never spends the client's
    privacy budget twice), else a new one from :func:`train_client` (``training``: its keyword arguments).

    ``train-client``, ``simulate`` and the Flower client all answer a round through here. A stale update at ``out``
    (another parent) is replaced when ``overwrite``; ``no_data`` is the message when ``data`` is None.
    """
    g = Global.of(global_checkpoint)
    round_ = g.manifest.round + 1
    if resend:
        before = existing_update(out, g, client_id)
        state = storage.latest_state(state_dir, before_round=round_ + 1) if before is not None else None
        # The state of the round is written before its update: without it, the update is not this client's.
        if state is not None and state.manifest.round == round_:
            return ClientRound(before, state, resent=True)
    if data is None:
        raise FedloraError(no_data or f"client '{client_id}' has no training data")
    # An update of this round from another parent is stale. If the state already holds this round (a crash between
    # writing state and update) the round is trained again and its ledger counts it twice: an over-count, never an
    # under-count.
    return train_client(g, data, state_dir, out, client_id, overwrite=overwrite, **training)


def check_state(state: storage.ClientState | None, client_id: str, manifest: GlobalManifest) -> None:
    if state is None:
        return
    if state.manifest.client_id != client_id:
        raise FedloraError(
            f"client state {state.path.parent} belongs to client '{state.manifest.client_id}', not '{client_id}'"
        )
    if state.manifest.recipe_digest != manifest.recipe_digest:
        raise FedloraError(f"client state {state.path.parent} was written for a different recipe")


def train_client(
    global_checkpoint: Path | Global,
    shard: Path | str,
    state_dir: Path,
    out: Path,
    client_id: str,
    *,
    base_override: str | None = None,
    bench: Workbench | None = None,
    progress: Callable[[int, int, float], None] | None = None,
    overwrite: bool = False,
    site: Mapping[str, Any] | None = None,
    split: str | None = None,
) -> ClientRound:
    """Train one client for one round; write its client update (sent tensors) and its state (kept tensors).

    ``site`` overrides the recipe's site settings for this site (``{'training.device': 'cuda', 'model.quantization':
    '4bit'}``, see :mod:`fedlora_cli.model.site`); a given ``bench`` was built with its own.

    ``shard`` is the client's partition shard or the site's own data (any source partition reads, ``split`` of a
    Hub dataset defaulting to the recipe's ``data.split``), read through the recipe's columns and the federation's
    label names before anything is loaded or written.
    """
    from fedlora_cli.data.examples import read_examples
    from fedlora_cli.model.training import local_train, round_seed

    storage.check_client_id(client_id)
    g = Global.of(global_checkpoint)
    recipe, round_ = g.recipe, g.manifest.round + 1
    out = Path(out)
    if out.exists() and not overwrite:
        raise FedloraError(f"{out} already exists (pass --overwrite to replace it)")
    examples = read_examples(shard, recipe.data, recipe.model.task, g.manifest.num_labels, g.label_names, split)
    # An update the coordinator would refuse is not trained: under DP-SGD it would spend budget for nothing.
    why = not_asked(recipe.federation, recipe.training.seed, round_, client_id, recipe.server_privacy is not None)
    if why is not None:
        raise FedloraError(f"refusing to train client '{client_id}', which {why}: the coordinator would refuse its "
                           "update; nothing written")
    state, newest = _states(g, state_dir, client_id, overwrite)
    g.verify()  # before the base model is loaded
    bench = bench_for(g, base_override, bench, recipe.adapter.rank_for(client_id), site)
    ledger, dp = _privacy_for_round(recipe, newest, len(examples), client_id)
    load_client_model(bench, g.plan, g.verified_tensors, state, g.verified_correction)
    result = local_train(bench, g.plan, examples, round_seed(recipe.training.seed, client_id, round_), progress, dp)
    if ledger is not None:
        ledger.history.append((dp.noise_multiplier, dp.sample_rate, result.steps))
    return _write_round(g, bench.adapter_tensors(), result, ledger=ledger, shard_size=len(examples),
                        client_id=client_id, state_dir=Path(state_dir), out=out, overwrite=overwrite,
                        site={**bench.site.to_dict(), "threads": result.threads}, carried=_residuals(state))


def _states(
    g: Global, state_dir: Path, client_id: str, overwrite: bool
) -> tuple[storage.ClientState | None, storage.ClientState | None]:
    """The client's state to start this round from, and its newest state (which carries the privacy ledger)."""
    round_ = g.manifest.round + 1
    state = storage.latest_state(state_dir, before_round=round_)
    # The newest state of all carries the privacy ledger: retraining a round must not forget its spending.
    newest = storage.latest_state(state_dir)
    check_state(newest, client_id, g.manifest)
    if newest is not None and newest.manifest.round > round_:
        raise FedloraError(
            f"client state {state_dir} is at round {newest.manifest.round}, ahead of this global checkpoint "
            f"(round {g.manifest.round}): wrong global checkpoint or wrong state folder"
        )
    if newest is not None and newest.manifest.round == round_ and not overwrite:
        raise FedloraError(
            f"client '{client_id}' already trained round {round_} (state {newest.path}); pass --overwrite to train it again"
        )
    return state, newest


def _write_round(
    g: Global, tensors: dict[str, torch.Tensor], result: TrainResult, *, ledger: privacy.Ledger | None,
    shard_size: int, client_id: str, state_dir: Path, out: Path, overwrite: bool, site: dict[str, Any] | None = None,
    carried: Mapping[str, Any] | None = None,
) -> ClientRound:
    """Check what training produced, split it into what is sent and what is kept, write state then update.

    Under an update encoding other than float32 what is sent is the encoded difference from what the client
    received, and the rounding error joins what is kept (``carried``: the last round's, error feedback)."""
    plan, manifest = g.plan, g.manifest
    if not frozen_unchanged(plan, tensors, manifest):
        raise FedloraError(f"a frozen adapter tensor ({frozen_labels(plan)}) changed during training; nothing written")
    sent = {name: t for name, t in tensors.items() if plan.sends(name)}
    kept = {name: t for name, t in tensors.items() if plan.keeps(name)}
    bad = aggregation.nonfinite(sent) or aggregation.nonfinite(kept)
    if bad is not None:
        raise FedloraError(f"training diverged: tensor '{bad}' holds NaN or Inf (lower training.lr); nothing written")
    encoding = g.recipe.federation.update_encoding
    if encoding != encodings.RAW:
        sent, residuals = _encoded(g, sent, carried or {}, g.recipe.adapter.rank_for(client_id), encoding)
        kept.update(residuals)
    spending = None if ledger is None else ledger.to_dict()  # the accountant, once for the round
    # Under DP-SGD only the noised tensors may leave the client. The mean training loss is a function of the data
    # with no noise, so it stays at home; the example count sent is the shard size, which the sample rate
    # (q = batch / n, part of what the accountant composes) already discloses, rather than the number of
    # distinct examples the secret Poisson sampling happened to draw.
    private = ledger is not None
    update_manifest = UpdateManifest(
        client_id=client_id, round=manifest.round + 1, parent_digest=manifest.digest, method=manifest.method,
        recipe_digest=manifest.recipe_digest, base_fingerprint=manifest.base_fingerprint,
        frozen_digest=manifest.frozen_digest, num_examples=shard_size if private else result.num_examples,
        shard_examples=shard_size, steps=result.steps, loss=None if private else result.loss,
        seconds=round(result.seconds, 3), bytes=0, tensor_digests=digests(sent),
        privacy=None if spending is None else {k: v for k, v in spending.items() if k != "history"}, site=site,
        encoding=encoding,
    )
    state_manifest = StateManifest(
        client_id=client_id, round=manifest.round + 1, parent_digest=manifest.digest,
        recipe_digest=manifest.recipe_digest, tensor_digests=digests(kept),
        privacy=spending, loss=result.loss,
    )
    # The update is written in full first (where a full disk fails, leaving nothing), then the state with the
    # ledger that records this round's spending, then the update is renamed into place: the ledger never counts an
    # update that was not written, and only a crash between the last two steps leaves it counting one (an
    # over-count, never an under-count).
    with storage.staged_update(out, update_manifest, sent, overwrite=overwrite) as update:
        state = storage.write_state(state_dir, state_manifest, kept)
    return ClientRound(update, state)


def _residuals(state: storage.ClientState | None) -> dict[str, torch.Tensor]:
    """The rounding errors the client's last round kept (error feedback), by sent tensor name."""
    if state is None:
        return {}
    return {name.rsplit(encodings.SEPARATOR, 1)[0]: t for name, t in state.tensors().items()
            if encodings.is_residual(name)}


def _encoded(
    g: Global, sent: Mapping[str, torch.Tensor], carried: Mapping[str, torch.Tensor], rank: int, encoding: str
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The sent tensors as they travel under ``encoding`` (:mod:`fedlora_cli.storage.encoding`): each one's
    difference from what this client received (the global at its rank, computed in numpy as the coordinator
    computes it), plus the error the last round's encoding left (error feedback, Seide et al. 2014; Karimireddy
    et al. 2019), encoded; and this round's error, to keep in the client state as ``NAME::residual``.

    Under DP-SGD the tensors are already noised, and the received global and the carried error are functions of
    earlier released, noised outputs: both the update and the error are post-processing of what the accountant
    covers, so encoding changes no epsilon.
    """
    import torch

    from fedlora_cli.storage.mapped import widen

    received = received_tensors(g.recipe, {n: widen(a) for n, a in g.verified_arrays.items()}, rank)
    deltas = {}
    for name, t in sent.items():
        delta = t.detach().float().cpu().numpy() - received[name]
        if name in carried:
            delta = delta + carried[name].float().numpy()
        deltas[name] = delta
    stored, residuals = encodings.encode_update(deltas, encoding)
    return stored, {encodings.residual_name(name): torch.from_numpy(r) for name, r in residuals.items()}


def _privacy_for_round(
    recipe: recipes.Recipe, state: storage.ClientState | None, examples: int, client_id: str
) -> tuple[privacy.Ledger | None, DPSettings | None]:
    """The client's ledger so far and this round's DP-SGD settings; refuses a round that would break the budget."""
    from fedlora_cli.model.training import DPSettings

    p = recipe.privacy
    if p is None:
        return None, None
    if p.noise_multiplier is None and p.calibration != "client":
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
    # Under 'client' calibration this client's own sigma: the one its plan needs for the whole federation.
    sigma = (privacy.calibrate_noise(p, [plan], recipe.federation.rounds) if p.calibration == "client"
             else p.noise_multiplier)
    dp = DPSettings(noise_multiplier=sigma, max_grad_norm=p.max_grad_norm, sample_rate=plan.sample_rate)
    if p.target_epsilon is not None:
        after = ledger.epsilon([(dp.noise_multiplier, dp.sample_rate, plan.steps_per_round)])
        if after > p.target_epsilon:
            spent = ledger.epsilon()
            raise FedloraError(
                f"privacy budget: client '{client_id}' has spent epsilon {spent:.3f} of {p.target_epsilon:g}; "
                f"this round would bring it to {after:.3f}. Nothing was trained or written"
            )
    return ledger, dp
