"""The ClientApp every SuperNode runs (``[tool.flwr.app.components] clientapp``): Flower's messages in, fedlora's
site (:mod:`.site`) does the work, fedlora's folders out.

Messages (the record names are the constants below; folders travel as :mod:`.transport` packs them)::

    query      in:  QUERY {global-manifest}          out: REPLY {client-id, base-fingerprint, site}
    train      in:  the global checkpoint            out: REPLY {client-id, resent} + the client update
    evaluate   in:  the global checkpoint            out: REPLY {client-id} + METRICS {global.*, personal.*}

A site that cannot do what is asked (no data, another base model, a spent privacy budget) replies
REPLY {client-id, error} with fedlora's one-line message instead of raising, so the server names the client and
the reason. Under DP-SGD no reply carries the training loss (the update's manifest leaves it out, and no metric
is added here): it is a function of the private data with no noise, and Flower logs metrics.

With a resident site worker (:mod:`.worker`; the node config's ``worker``: "auto" uses one when its socket
STATE-DIR/worker.sock exists, "required" always, "off" never) this app is a relay that imports no torch: it unpacks
the received global into the site's work folder, asks the worker over :mod:`.channel` (one JSON line each way), and
packs the update the worker wrote. A worker that stops mid-request becomes an error reply naming the client and what
it was doing ("the site worker at ... stopped while training round N"), so the round goes on without it. Without a
worker the app does the work itself, loading the base model for the message.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedlora_cli.errors import FedloraError, first_line
from fedlora_cli.flower import channel, site as sites, transport

QUERY = "fedlora.query"
REPLY = "fedlora.reply"
METRICS = "fedlora.metrics"
GLOBAL = "global"
UPDATE = "update"
MANIFEST_KEY = "global-manifest"
ERROR_KEY = "error"
RESENT_KEY = "resent"

app = ClientApp()


@dataclass(frozen=True)
class Relay:
    """The site's resident worker, reached at ``path``; every request carries the SuperNode's node config, and
    waits for its answer until ``deadline`` (a time.time(); None: as long as it takes)."""

    path: Path
    node_config: dict[str, Any]
    deadline: float | None = None

    def ask(self, request: dict[str, Any], doing: str) -> dict[str, Any]:
        timeout = None if self.deadline is None else max(0.1, self.deadline - time.time())
        return channel.ask(self.path, {**request, "node-config": self.node_config}, doing, timeout)


def relay_for(site: sites.SiteConfig, node_config: Mapping[str, Any], msg: Message | None = None) -> Relay | None:
    """The worker to relay to, or None when this app does the work itself (worker "off", or "auto" and no socket).
    With ``msg``, the relay waits no longer than the message lives (its TTL), less a margin to send the reply."""
    if site.worker == "off":
        return None
    path = channel.socket_path(site.state_dir)
    if site.worker == "auto" and not os.path.lexists(path):
        return None
    deadline = None
    if msg is not None and msg.metadata.ttl:
        ttl = float(msg.metadata.ttl)
        deadline = float(msg.metadata.created_at) + ttl - min(5.0, 0.1 * ttl)
    return Relay(path, dict(node_config), deadline)


Work = Callable[[sites.SiteConfig, Message, "Relay | None"], dict[str, Any]]


def _answer(msg: Message, context: Context, work: Work) -> Message:
    client_id = str(context.node_config.get(sites.CLIENT_ID, ""))
    try:
        site = sites.SiteConfig.from_node_config(context.node_config)
        records = work(site, msg, relay_for(site, context.node_config, msg))
    except FedloraError as exc:
        records = {REPLY: ConfigRecord({sites.CLIENT_ID: client_id, ERROR_KEY: first_line(exc)})}
    return Message(RecordDict(records), reply_to=msg)


def _received(site: sites.SiteConfig, msg: Message):
    """Unpack the global checkpoint a message carries into the site's work folder (kept if already there)."""
    from fedlora_cli import storage

    manifest = sites.manifest_of(transport.text_of(msg.content, GLOBAL, storage.GLOBAL_MANIFEST))
    folder = site.received(sites.federation_folder(manifest), manifest.round)
    existing = folder / storage.GLOBAL_MANIFEST
    if not existing.is_file() or sites.manifest_of(existing.read_text()).digest != manifest.digest:
        transport.unpack(msg.content, GLOBAL, folder, overwrite=True)
    return sites.keep_received(site, folder)


def _query(site: sites.SiteConfig, msg: Message, relay: Relay | None) -> dict[str, Any]:
    text = str(msg.content[QUERY][MANIFEST_KEY])
    if relay is None:
        return {REPLY: ConfigRecord(sites.describe(site, sites.manifest_of(text)))}
    answer = relay.ask({"op": "query", "manifest": text}, "saying who the site is")  # the worker reads it
    return {REPLY: ConfigRecord({str(k): str(v) for k, v in answer.items()})}


def _trained(site: sites.SiteConfig, g, relay: Relay | None) -> tuple[bool, Path]:
    """The site's update of the round after ``g``, made here or by its worker: (sent again, its folder)."""
    r = g.manifest.round + 1
    if relay is None:
        done = sites.train(site, g)
        return done.resent, Path(done.update.path)
    federation = sites.federation_folder(g.manifest)
    answer = relay.ask({"op": "train", "federation": federation, "round": g.manifest.round,
                        "digest": g.manifest.digest}, f"training round {r}")
    # The worker reads the same node config (it checked), so the update is where this site keeps it.
    return bool(answer.get(RESENT_KEY)), site.update(federation, r)


def _train(site: sites.SiteConfig, msg: Message, relay: Relay | None) -> dict[str, Any]:
    from fedlora_cli.federation.secure import refuse_in_the_clear

    g = _received(site, msg)
    # A coordinator that asks a secure federation's site through the plain app never gets its update in the clear.
    refuse_in_the_clear(g.recipe, "to send this site's update in a plain training message")
    resent, update = _trained(site, g, relay)
    return {REPLY: ConfigRecord({sites.CLIENT_ID: site.client_id, RESENT_KEY: resent}),
            **transport.pack(update, UPDATE)}


def _evaluate(site: sites.SiteConfig, msg: Message, relay: Relay | None) -> dict[str, Any]:
    g = _received(site, msg)
    if relay is None:
        metrics = sites.evaluate(site, g)
    else:
        answer = relay.ask({"op": "evaluate", "federation": sites.federation_folder(g.manifest),
                            "round": g.manifest.round, "digest": g.manifest.digest},
                           f"evaluating round {g.manifest.round}")
        found = answer.get("metrics")
        metrics = {str(k): float(v) for k, v in (found if isinstance(found, dict) else {}).items()}
    return {REPLY: ConfigRecord({sites.CLIENT_ID: site.client_id}), METRICS: MetricRecord(metrics)}


def _train_secure(site: sites.SiteConfig, msg: Message, relay: Relay | None) -> dict[str, Any]:
    """The training message of SecAgg+'s third stage: train (or resend) as :func:`_train` does, then hand
    ``secaggplus_mod`` this site's vector, made and checked here (:func:`fedlora_cli.federation.secure.site_vector`);
    the update itself stays in the site's state folder."""
    from fedlora_cli.federation import secure
    from fedlora_cli.federation.server import check_update
    from fedlora_cli.flower.secure import site_reply

    g = _received(site, msg)
    _, update = _trained(site, g, relay)
    vector = secure.site_vector(g, check_update(g, update), site.client_id)
    return dict(site_reply(vector, vector.counts(g.recipe)).items())


def secure_train(msg: Message, context: Context) -> Message:
    """A site's refusal cannot travel as a reply here (SecAgg+'s mod needs a FitRes), so it is raised: Flower turns
    it into an error reply, the workflow counts the site as dropped, and the server logs its one line."""
    reply = _answer(msg, context, _train_secure)
    answer = reply.content.config_records.get(REPLY)
    if answer is not None and ERROR_KEY in answer:
        raise FedloraError(str(answer[ERROR_KEY]))
    return reply


def _secure_app() -> ClientApp:
    """The ClientApp of a federation under secure aggregation: the same query and evaluate, training inside
    Flower's ``secaggplus_mod``."""
    from flwr.client.mod import secaggplus_mod

    secure_app = ClientApp()
    secure_app.query()(query)
    secure_app.evaluate()(evaluate)
    secure_app.train(mods=[secaggplus_mod])(secure_train)
    return secure_app


@app.query()
def query(msg: Message, context: Context) -> Message:
    return _answer(msg, context, _query)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return _answer(msg, context, _train)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return _answer(msg, context, _evaluate)


secure_app = _secure_app()
