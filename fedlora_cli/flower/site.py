"""What a site does when the federation asks, without Flower: who it is, a round of training, an evaluation.

A site is configured once, by its SuperNode's ``--node-config`` (TOML values; strings quoted)::

    client-id="site-a"            the client's identity in the federation (never Flower's node id, which changes)
    data="/data/a.csv"            the site's own training data (any source partition reads)
    state-dir="/var/fedlora/a"    the client state folder (its kept tensors and privacy ledger)
    work-dir="/var/fedlora/a-in"  optional: where received globals and sent updates are kept (default STATE-DIR/flower)
    test-data="/data/a-test.csv"  optional: the site's test data, for evaluate messages
    base="/models/minilm"         optional: where this site's copy of the base model is
    split="train"                 optional: the split of a Hub dataset
    device="cuda" dtype="bfloat16" quantization="4bit" mixed-precision="bf16" gradient-checkpointing=true
    accumulation-steps=4          optional site settings (see fedlora_cli.model.site)
    worker="auto"                 optional: "auto" (default) relays each message to the site's resident worker
                                  when its socket STATE-DIR/worker.sock exists, "required" always does (a missing
                                  worker is an error reply), "off" never does (see fedlora_cli.flower.worker)

The update a round made stays in the work folder: a round sent again (the server restarted, a reply was lost)
is answered with that update, not trained again, so no round spends the site's privacy budget twice.
"""

from __future__ import annotations

import json
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

CLIENT_ID, DATA, STATE_DIR, WORK_DIR, TEST_DATA, BASE, SPLIT, WORKER = (
    "client-id", "data", "state-dir", "work-dir", "test-data", "base", "split", "worker",
)
WORKER_MODES = ("auto", "required", "off")
# node-config key -> the recipe's site setting it overrides (fedlora_cli.recipe.site_settings declares both).
SITE_SETTINGS = {setting.node_key: setting.key for setting in recipes.SITE_SETTINGS}
_PATHS = (CLIENT_ID, DATA, STATE_DIR, WORK_DIR, TEST_DATA, BASE, SPLIT, WORKER)
WORK_SUBDIR = "flower"


@dataclass(frozen=True)
class SiteConfig:
    client_id: str
    state_dir: Path
    work_dir: Path
    data: str | None = None
    test_data: str | None = None
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
            data=node_config.get(DATA), test_data=node_config.get(TEST_DATA), base=node_config.get(BASE),
            split=node_config.get(SPLIT),
            settings={SITE_SETTINGS[k]: v for k, v in node_config.items() if k in SITE_SETTINGS}, worker=worker,
        )

    def received(self, round_: int) -> Path:
        """Where the global checkpoint of ``round_`` is kept once received."""
        return self.work_dir / "global" / round_dirname(round_)

    def update(self, round_: int) -> Path:
        """Where this site's client update of ``round_`` is kept (and sent again from)."""
        return self.work_dir / "updates" / round_dirname(round_)


def manifest_of(text: str) -> GlobalManifest:
    """A global checkpoint's manifest from its JSON text (as a query carries it)."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):  # a relay's text, so far checked by nobody
        raise FedloraError("the global checkpoint manifest sent is not valid JSON") from None
    return _from_dict(GlobalManifest, data, Path("fedlora.json"), "global checkpoint manifest")


def describe(site: SiteConfig, manifest: GlobalManifest, bench: Workbench | None = None) -> dict[str, str]:
    """Who this site is and which base model it holds (its fingerprint), for the server to check before training.

    The fingerprint reads the stored weights, so a site loading the same base in 4 bits agrees with one loading it
    in float32. Unless ``bench`` (a resident worker's) holds the model already, it is read from the base's files
    (:func:`fedlora_cli.model.fingerprint.fingerprint`: no model load, no torch import) and the site line names
    the settings as given (an 'auto' device is resolved when the site trains); a base without safetensors files
    (a GGUF base, a Hub id not downloaded yet) is loaded as the site would train it (its own path and settings).
    """
    recipe = recipes.from_dict(manifest.recipe)
    if bench is None:
        try:
            value = fingerprints.of_recipe(recipe, manifest.num_labels, site.base)
        except fingerprints.NotStored:
            bench = build_for_site(recipe, manifest.num_labels, site.base, site.settings)
        else:
            chosen = recipes.with_site(recipe, site.settings, SITE_FLAGS)
            line = Site(**{setting.name: setting.of(chosen) for setting in recipes.SITE_SETTINGS}).describe()
            return {CLIENT_ID: site.client_id, "base-fingerprint": value, "site": line}
    return {CLIENT_ID: site.client_id, "base-fingerprint": bench.fingerprint, "site": bench.site.describe()}


def keep_received(site: SiteConfig, folder: Path) -> Global:
    """The global checkpoint just unpacked to ``folder``; older received globals are deleted (a site needs only
    the one it trains from)."""
    g = Global.of(folder)
    for old in (site.work_dir / "global").glob("round-*"):
        if old.is_dir() and old.name != folder.name:
            shutil.rmtree(old, ignore_errors=True)
    return g


def train(site: SiteConfig, g: Global, bench: Workbench | None = None) -> ClientRound:
    """This site's update for the round after ``g`` (:func:`fedlora_cli.federation.client.site_round`): the one it
    made before from this very global, sent again (``resent``), or a new one, trained on ``bench`` when given (a
    resident worker's, built with this site's settings at its rank)."""
    return site_round(g, site.data, site.state_dir, site.update(g.manifest.round + 1), site.client_id,
                      no_data=f"site '{site.client_id}' has no data=\"...\" in its --node-config; it cannot train",
                      base_override=site.base, site=site.settings, split=site.split, bench=bench)


def evaluate(site: SiteConfig, g: Global, bench_of: Callable[[int], Workbench] | None = None) -> dict[str, float]:
    """The global model's metrics on this site's test data, and its personalised model's (``personal.*``) when
    the method keeps tensors at home (FedSA's B, a local head) or the site trains another rank; numbers only.
    ``bench_of(rank)`` gives the workbench of a rank (a resident worker's); by default one is built here."""
    from fedlora_cli import federation

    if site.test_data is None:
        raise FedloraError(f"site '{site.client_id}' has no test-data=\"...\" in its --node-config; it cannot evaluate")
    recipe = g.recipe
    bench = (bench_of(recipe.adapter.r) if bench_of is not None
             else build_for_site(recipe, g.manifest.num_labels, site.base, site.settings))
    metrics = {f"global.{k}": v for k, v in _numbers(
        federation.evaluate(g, site.test_data, base_override=site.base, bench=bench, split=site.split)).items()}
    personal = bool(g.plan.local) or bool(recipe.adapter.client_ranks)
    if personal and storage.latest_state(site.state_dir, g.manifest.round + 1) is not None:
        rank = recipe.adapter.rank_for(site.client_id)
        own = bench if rank == bench.rank else (bench_of(rank) if bench_of is not None else None)
        result = federation.evaluate(g, site.test_data, state_dir=site.state_dir, client_id=site.client_id,
                                     base_override=site.base, bench=own, site=site.settings, split=site.split)
        metrics.update({f"personal.{k}": v for k, v in _numbers(result).items()})
    return metrics


def _numbers(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "round"}
