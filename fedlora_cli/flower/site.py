"""What a site does when the federation asks, without Flower: who it is, a round of training, an evaluation.

A site is configured once, by its SuperNode's ``--node-config`` (TOML values; strings quoted)::

    client-id="site-a"            the client's identity in the federation (never Flower's node id, which changes)
    data="/data/a.csv"            the site's own training data (any source partition reads)
    state-dir="/var/fedlora/a"    the site's folder: each federation's client state (its kept tensors and privacy
                                  ledger) in STATE-DIR/<federation>/, and the worker's socket
    work-dir="/var/fedlora/a-in"  optional: where received globals and sent updates are kept, per federation too
                                  (default STATE-DIR/flower)
    test-data="/data/a-test.csv"  optional: the site's test data, for evaluate messages
    validation-data="/data/a-val.csv"  optional: the site's own validation data, scored beside test-data
    base="/models/minilm"         optional: where this site's copy of the base model is
    split="train"                 optional: the split of a Hub dataset
    device="cuda" dtype="bfloat16" quantization="4bit" mixed-precision="bf16" gradient-checkpointing=true
    accumulation-steps=4          optional site settings (see fedlora_cli.model.site)
    worker="auto"                 optional: "auto" (default) relays each message to the site's resident worker
                                  when its socket STATE-DIR/worker.sock exists, "required" always does (a missing
                                  worker is an error reply), "off" never does (see fedlora_cli.flower.worker)

The update a round made stays in the work folder: a round sent again (the server restarted, a reply was lost)
is answered with that update, not trained again, so no round spends the site's privacy budget twice.

A site takes part in several federations, one folder each (:func:`federation_folder`: the recipe's name and digest,
which every global checkpoint of a federation carries), so that one federation's state never meets another's. Its
epsilon is per federation, as each federation's accountant states it: what the site's data spends over all the
federations it joins composes on top. Asked who it is, a site also says whether it can train this federation
(:func:`check_ready`): one whose state is ahead of the federation's global (it ran this recipe before) is refused
then, before any site trains a round that could not be aggregated.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedlora_cli import recipe as recipes, storage
from fedlora_cli.errors import FedloraError
from fedlora_cli.federation.client import ClientRound, site_round
from fedlora_cli.federation.common import Global, build_for_site
from fedlora_cli.model import fingerprint as fingerprints
from fedlora_cli.model.site import SITE_FLAGS, Site
from fedlora_cli.model.workbench import Workbench
from fedlora_cli.storage.checkpoints import round_dirname
from fedlora_cli.storage.manifests import GlobalManifest, _from_dict

CLIENT_ID, DATA, STATE_DIR, WORK_DIR, TEST_DATA, VALIDATION_DATA, BASE, SPLIT, WORKER = (
    "client-id", "data", "state-dir", "work-dir", "test-data", "validation-data", "base", "split", "worker",
)
# The prefix of a site's scores on its validation data in an evaluate reply (beside global.*, personal.*).
VALIDATION_PREFIX = "validation."
WORKER_MODES = ("auto", "required", "off")
# node-config key -> the recipe's site setting it overrides (fedlora_cli.recipe.site_settings declares both).
SITE_SETTINGS = {setting.node_key: setting.key for setting in recipes.SITE_SETTINGS}
_PATHS = (CLIENT_ID, DATA, STATE_DIR, WORK_DIR, TEST_DATA, VALIDATION_DATA, BASE, SPLIT, WORKER)
WORK_SUBDIR = "flower"


@dataclass(frozen=True)
class SiteConfig:
    client_id: str
    state_dir: Path
    work_dir: Path
    data: str | None = None
    test_data: str | None = None
    validation_data: str | None = None
    base: str | None = None
    split: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)  # recipe site key -> value
    worker: str = "auto"  # one of WORKER_MODES

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> SiteConfig:
        """The site a SuperNode's ``--node-config`` describes; an unknown key or a missing id is refused."""
        unknown = sorted(set(node_config) - set(_PATHS) - set(SITE_SETTINGS))
        if unknown:
            raise FedloraError(
                f"node config key {unknown[0]!r} is unknown (known: {', '.join((*_PATHS, *SITE_SETTINGS))})"
            )
        for key in (CLIENT_ID, STATE_DIR):
            if not isinstance(node_config.get(key), str) or not node_config[key]:
                raise FedloraError(f"the SuperNode's --node-config lacks {key}=\"...\" (a quoted string)")
        for key in _PATHS:
            if key in node_config and not isinstance(node_config[key], str):
                raise FedloraError(f"node config {key} must be a quoted string, got {node_config[key]!r}")
        client_id = storage.check_client_id(node_config[CLIENT_ID])
        worker = node_config.get(WORKER, "auto")
        if worker not in WORKER_MODES:
            raise FedloraError(f"node config {WORKER} must be one of {', '.join(WORKER_MODES)}, got {worker!r}")
        state_dir = Path(node_config[STATE_DIR])
        return cls(
            client_id=client_id, state_dir=state_dir,
            work_dir=Path(node_config.get(WORK_DIR) or state_dir / WORK_SUBDIR),
            data=node_config.get(DATA), test_data=node_config.get(TEST_DATA),
            validation_data=node_config.get(VALIDATION_DATA), base=node_config.get(BASE),
            split=node_config.get(SPLIT),
            settings={SITE_SETTINGS[k]: v for k, v in node_config.items() if k in SITE_SETTINGS}, worker=worker,
        )

    def state(self, federation: str) -> Path:
        """This site's client state folder in ``federation`` (a :func:`federation_folder` name)."""
        return self.state_dir / check_federation(federation)

    def received(self, federation: str, round_: int) -> Path:
        """Where the global checkpoint of ``round_`` of ``federation`` is kept once received."""
        return self.work_dir / check_federation(federation) / "global" / round_dirname(round_)

    def update(self, federation: str, round_: int) -> Path:
        """Where this site's client update of ``round_`` of ``federation`` is kept (and sent again from)."""
        return self.work_dir / check_federation(federation) / "updates" / round_dirname(round_)


# A federation's folder name: the recipe's name (letters, digits, '.', '_', '-'; at most 40) and 16 hex digits.
_FEDERATION = re.compile(r"^[A-Za-z0-9_.-]{1,40}-[0-9a-f]{16}$")


def federation_folder(manifest: GlobalManifest) -> str:
    """The folder of a federation at a site: its recipe's name and the first 16 hex digits of the recipe digest.
    The recipe pins the base model, the method, the clients and the seed (so its round-0 global), and every global
    checkpoint of the federation carries its digest: a site finds the folder from any message."""
    # Runs of dots are collapsed: a name is never '..' or holds it (check_federation refuses both).
    name = re.sub(r"\.{2,}", ".", re.sub(r"[^A-Za-z0-9_.-]", "-", str(manifest.recipe.get("name", ""))))
    name = name[:40].strip(".") or "federation"
    digest = manifest.recipe_digest.split(":")[-1][:16]
    return check_federation(f"{name}-{digest}")


def check_federation(federation: str) -> str:
    if not isinstance(federation, str) or not _FEDERATION.match(federation) or ".." in federation:
        raise FedloraError(f"{federation!r} is not a federation's folder name (NAME-<16 hex digits>)")
    return federation


def check_ready(site: SiteConfig, manifest: GlobalManifest) -> None:
    """Refuse (one line) a site that cannot train the federation of ``manifest`` from its round on: its state folder
    holds a state of one federation directly (written before a folder was kept per federation), or its state in
    this federation belongs to another client or is ahead of the global (the same recipe run before)."""
    from fedlora_cli.federation.client import check_state

    if storage.state_rounds(site.state_dir):
        raise FedloraError(
            f"{site.state_dir} holds client state rounds directly, written before fedlora kept a folder per "
            f"federation: move its round-* folders into {site.state_dir}/<recipe name>-<digest>/ (this "
            f"federation's is {federation_folder(manifest)}, if they are of this recipe)")
    folder = site.state(federation_folder(manifest))
    newest = storage.latest_state(folder)
    check_state(newest, site.client_id, manifest)
    if newest is not None and newest.manifest.round > manifest.round + 1 and not _answered(site, manifest):
        raise FedloraError(
            f"client state {folder} is at round {newest.manifest.round}, ahead of this federation's global checkpoint "
            f"(round {manifest.round}), with no update of round {manifest.round + 1} from it to send again: this site "
            "ran this recipe before; resume that run, or give the site a new state-dir")


def _answered(site: SiteConfig, manifest: GlobalManifest) -> bool:
    """Whether the site holds its update of the round after ``manifest``, made from it (a run of the same recipe
    replayed: it is sent again, not trained again)."""
    path = site.update(federation_folder(manifest), manifest.round + 1)
    try:
        made = storage.read_update(path).manifest if path.is_dir() else None
    except FedloraError:
        return False
    return made is not None and made.parent_digest == manifest.digest and made.client_id == site.client_id


def manifest_of(text: str) -> GlobalManifest:
    """A global checkpoint's manifest from its JSON text (as a query carries it)."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):  # a relay's text, so far checked by nobody
        raise FedloraError("the global checkpoint manifest sent is not valid JSON") from None
    return _from_dict(GlobalManifest, data, Path("fedlora.json"), "global checkpoint manifest")


def describe(site: SiteConfig, manifest: GlobalManifest,
             bench_of: Callable[[], Workbench] | None = None) -> dict[str, str]:
    """Who this site is and which base model it holds (its fingerprint), for the server to check before training.

    The fingerprint reads the stored weights, so a site loading the same base in 4 bits agrees with one loading it
    in float32. It is read from the base's files (:func:`fedlora_cli.model.fingerprint.fingerprint`: no model
    load, no torch import), also by a resident worker, whose first round then loads the model once; the site line
    names the settings as given (an 'auto' device is resolved when the site trains). Only a base without
    safetensors files (a GGUF base, a Hub id not downloaded yet) is loaded to be identified, as the site would train
    it (its own path and settings): by ``bench_of()`` when given (a worker's, kept for its first round).
    """
    check_ready(site, manifest)
    recipe = recipes.from_dict(manifest.recipe)
    try:
        value = fingerprints.of_recipe(recipe, manifest.num_labels, site.base)
    except fingerprints.NotStored:
        bench = bench_of() if bench_of is not None else build_for_site(recipe, manifest.num_labels, site.base,
                                                                         site.settings)
        return {CLIENT_ID: site.client_id, "base-fingerprint": bench.fingerprint, "site": bench.site.describe()}
    chosen = recipes.with_site(recipe, site.settings, SITE_FLAGS)
    line = Site(**{setting.name: setting.of(chosen) for setting in recipes.SITE_SETTINGS}).describe()
    return {CLIENT_ID: site.client_id, "base-fingerprint": value, "site": line}


def keep_received(site: SiteConfig, folder: Path) -> Global:
    """The global checkpoint just unpacked to ``folder``; older received globals are deleted (a site needs only
    the one it trains from)."""
    g = Global.of(folder)
    for old in folder.parent.glob("round-*"):
        if old.is_dir() and old.name != folder.name:
            shutil.rmtree(old, ignore_errors=True)
    return g


def train(site: SiteConfig, g: Global, bench: Workbench | None = None) -> ClientRound:
    """This site's update for the round after ``g`` (:func:`fedlora_cli.federation.client.site_round`): the one it
    made before from this very global, sent again (``resent``), or a new one, trained on ``bench`` when given (a
    resident worker's, built with this site's settings at its rank)."""
    check_ready(site, g.manifest)
    federation = federation_folder(g.manifest)
    return site_round(g, site.data, site.state(federation), site.update(federation, g.manifest.round + 1),
                      site.client_id,
                      no_data=f"site '{site.client_id}' has no data=\"...\" in its --node-config; it cannot train",
                      base_override=site.base, site=site.settings, split=site.split, bench=bench)


def evaluate(site: SiteConfig, g: Global, bench_of: Callable[[int], Workbench] | None = None) -> dict[str, float]:
    """The global model's metrics on this site's test data, and its personalised model's (``personal.*``) when
    the method keeps tensors at home (FedSA's B, a local head) or the site trains another rank; the same on the
    site's own validation data (``validation.global.*``, ``validation.personal.*``) when it names one; numbers only.
    ``bench_of(rank)`` gives the workbench of a rank (a resident worker's); by default one is built here."""
    if site.test_data is None:
        raise FedloraError(f"site '{site.client_id}' has no test-data=\"...\" in its --node-config; it cannot evaluate")
    recipe = g.recipe
    bench = (bench_of(recipe.adapter.r) if bench_of is not None
             else build_for_site(recipe, g.manifest.num_labels, site.base, site.settings))
    metrics = _scores_on(site, g, site.test_data, bench, bench_of)
    if site.validation_data is not None:
        validation = _scores_on(site, g, site.validation_data, bench, bench_of)
        metrics.update({f"{VALIDATION_PREFIX}{k}": v for k, v in validation.items()})
    return metrics


def _scores_on(site: SiteConfig, g: Global, data: str, bench: Workbench,
               bench_of: Callable[[int], Workbench] | None) -> dict[str, float]:
    """The global's (``global.*``) and, when the site has one, its personalised model's (``personal.*``) metrics on
    ``data``."""
    from fedlora_cli import federation

    recipe = g.recipe
    metrics = {f"global.{k}": v for k, v in _numbers(
        federation.evaluate(g, data, base_override=site.base, bench=bench, split=site.split)).items()}
    personal = bool(g.plan.local) or bool(recipe.adapter.client_ranks)
    state_dir = site.state(federation_folder(g.manifest))
    if personal and storage.latest_state(state_dir, g.manifest.round + 1) is not None:
        rank = recipe.adapter.rank_for(site.client_id)
        own = bench if rank == bench.rank else (bench_of(rank) if bench_of is not None else None)
        result = federation.evaluate(g, data, state_dir=state_dir, client_id=site.client_id,
                                     base_override=site.base, bench=own, site=site.settings, split=site.split)
        metrics.update({f"personal.{k}": v for k, v in _numbers(result).items()})
    return metrics


def _numbers(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "round"}
