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
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedlora_cli.errors import FedloraError, first_line
from fedlora_cli.flower import site as sites, transport

QUERY = "fedlora.query"
REPLY = "fedlora.reply"
METRICS = "fedlora.metrics"
GLOBAL = "global"
UPDATE = "update"
MANIFEST_KEY = "global-manifest"
ERROR_KEY = "error"
RESENT_KEY = "resent"

app = ClientApp()


def _answer(msg: Message, context: Context, work: Callable[[sites.SiteConfig, Message], dict[str, Any]]) -> Message:
    client_id = str(context.node_config.get(sites.CLIENT_ID, ""))
    try:
        site = sites.SiteConfig.from_node_config(context.node_config)
        records = work(site, msg)
    except FedloraError as exc:
        records = {REPLY: ConfigRecord({sites.CLIENT_ID: client_id, ERROR_KEY: first_line(exc)})}
    return Message(RecordDict(records), reply_to=msg)


def _received(site: sites.SiteConfig, msg: Message):
    """Unpack the global checkpoint a message carries into the site's work folder (kept if already there)."""
    from fedlora_cli import storage

    manifest = sites.manifest_of(transport.text_of(msg.content, GLOBAL, storage.GLOBAL_MANIFEST))
    folder = site.received(manifest.round)
    existing = folder / storage.GLOBAL_MANIFEST
    if not existing.is_file() or sites.manifest_of(existing.read_text()).digest != manifest.digest:
        transport.unpack(msg.content, GLOBAL, folder, overwrite=True)
    return sites.keep_received(site, folder)


def _query(site: sites.SiteConfig, msg: Message) -> dict[str, Any]:
    manifest = sites.manifest_of(str(msg.content[QUERY][MANIFEST_KEY]))
    return {REPLY: ConfigRecord(sites.describe(site, manifest))}


def _train(site: sites.SiteConfig, msg: Message) -> dict[str, Any]:
    done = sites.train(site, _received(site, msg))
    return {REPLY: ConfigRecord({sites.CLIENT_ID: site.client_id, RESENT_KEY: done.resent}),
            **transport.pack(Path(done.update.path), UPDATE)}


def _evaluate(site: sites.SiteConfig, msg: Message) -> dict[str, Any]:
    metrics = sites.evaluate(site, _received(site, msg))
    return {REPLY: ConfigRecord({sites.CLIENT_ID: site.client_id}), METRICS: MetricRecord(metrics)}


@app.query()
def query(msg: Message, context: Context) -> Message:
    return _answer(msg, context, _query)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return _answer(msg, context, _train)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return _answer(msg, context, _evaluate)
