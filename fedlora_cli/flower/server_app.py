"""The ServerApp (``[tool.flwr.app.components] serverapp``): fedlora's coordinator, with Flower carrying the folders.

It keeps the run folder ``fedlora simulate`` writes (:class:`fedlora_cli.storage.RunLayout`) on the SuperLink
host and, for each round not yet in it:

1. asks every SuperNode it does not know yet who it is (a query: client id and base-model fingerprint) and
   refuses, for the whole run, a site with another base model, a client id outside the federation or one
   another node already has;
2. sends the global checkpoint to the clients the round asks (every site, or the recipe's sample,
   :mod:`fedlora_cli.federation.sampling`) and collects their updates until ``round-timeout``;
3. checks each update in full as it arrives (:func:`fedlora_cli.federation.server.check_update`): a bad one is
   refused with the client named, and the round goes on without it, as it does without a dead or late node;
4. with at least ``federation.min_clients`` updates writes them to ``updates/round-NNN/CLIENT``, aggregates
   them with :func:`fedlora_cli.federation.aggregate_round` (every strategy, the norm bound, DP-FedAvg and its
   ledger, server optimisers) into ``global/round-NNN``; with fewer it stops with one line and writes nothing;
5. evaluates the new global on the test data, if there is any, and logs the table of rounds;
6. logs the round's row to the trackers ``report-to`` names (default: the recipe's ``tracking.report_to``) under
   the names ``fedlora simulate`` logs (:func:`fedlora_cli.tracking.round_metrics`), in ``RUN/tracking``; never
   the training loss of clients that train under DP-SGD (it stays with each client, as in ``fedlora aggregate``).

A restarted run starts after the newest global checkpoint, and within a round sends nothing to a client whose
update for it is already in the run folder. Settings come from the run config (``[tool.flwr.app.config]``,
written by ``fedlora flower app``; ``flwr run -c 'round-timeout=1200'`` overrides one); paths are on the
SuperLink host.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedlora_cli import federation, recipe as recipes, storage, tracking
from fedlora_cli.errors import FedloraError, first_line
from fedlora_cli.federation.common import Global
from fedlora_cli.federation.sampling import asked as sampled_clients, population
from fedlora_cli.federation.server import check_update
from fedlora_cli.flower import client_app as messages, transport
from fedlora_cli.flower.site import CLIENT_ID
from fedlora_cli.storage.checkpoints import round_dirname
from fedlora_cli.storage.files import write_json
from fedlora_cli.storage.run_layout import RunLayout

# Run config keys ([tool.flwr.app.config]).
RECIPE, RUN_DIR, ROUND_TIMEOUT, QUERY_TIMEOUT, TEST, BASE, CLIENT_EVALUATION, REPORT_TO = (
    "recipe", "run-dir", "round-timeout", "query-timeout", "test", "base", "client-evaluation", "report-to",
)
STAGING_DIR = ".flower-staging"


@dataclass(frozen=True)
class Settings:
    """The server app's settings (run config keys in brackets)."""

    recipe: Path  # [recipe] the recipe file on the SuperLink host
    run_dir: Path  # [run-dir] the run folder (RunLayout), created on the first run
    round_timeout: float = 900.0  # [round-timeout] seconds a round waits for its updates
    # [query-timeout] seconds a site has to say who it is: a fresh ClientApp process loads the base model to answer.
    query_timeout: float = 300.0
    test: str | None = None  # [test] test data on this host; default RUN/data/test.parquet when there is one
    base: str | None = None  # [base] the base model's path on this host (default: the recipe's model.base)
    client_evaluation: bool = False  # [client-evaluation] also ask each site to evaluate on its test-data
    # [report-to] trackers, comma-separated as --report-to ('none': none); default: the recipe's tracking.report_to
    report_to: str | None = None

    @classmethod
    def from_run_config(cls, config: Mapping[str, Any]) -> Settings:
        for key in (RECIPE, RUN_DIR):
            if not config.get(key):
                raise FedloraError(f"the run config lacks '{key}' (write the app folder with 'fedlora flower app')")
        timeouts = {}
        for key in (ROUND_TIMEOUT, QUERY_TIMEOUT):
            if key in config:
                value = config[key]
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                    raise FedloraError(f"run config '{key}' must be a positive number of seconds, got {value!r}")
                timeouts[key.replace("-", "_")] = float(value)
        return cls(recipe=Path(str(config[RECIPE])), run_dir=Path(str(config[RUN_DIR])), **timeouts,
                   test=str(config[TEST]) if config.get(TEST) else None,
                   base=str(config[BASE]) if config.get(BASE) else None,
                   client_evaluation=bool(config.get(CLIENT_EVALUATION, False)),
                   report_to=str(config[REPORT_TO]) if config.get(REPORT_TO) else None)


def _say(level: int, text: str) -> None:
    log(level, "fedlora: %s", text)


class Coordinator:
    """The round loop over a Grid (Flower's, or any object with ``get_node_ids`` and ``send_and_receive``)."""

    def __init__(self, grid: Grid, settings: Settings, say: Callable[[int, str], None] = _say) -> None:
        from fedlora_cli.federation.simulate import pin_recipe

        self.grid, self.settings, self.say = grid, settings, say
        self.recipe = recipes.load(settings.recipe)
        self.layout = RunLayout(settings.run_dir)
        # An unknown tracker or a missing tracker package fails here, before round 0 is written.
        self.trackers = tracking.open_run(tracking.resolve(settings.report_to, self.recipe), self.layout.root,
                                          self.recipe.name)
        pin_recipe(self.recipe, self.layout)
        self.clients: dict[int, str] = {}  # node id -> client id, from the sites' answers
        self.refused: set[int] = set()
        self.rows: list[dict[str, Any]] = []
        self._bench: Any = None

    # -- the run ---------------------------------------------------------------------------------------------
    def run(self) -> list[dict[str, Any]]:
        with self.trackers:
            current = self.start()
            for round_ in range(current.manifest.round + 1, self.recipe.federation.rounds + 1):
                started = time.monotonic()
                current, row = self.round(current)
                row.update(self.evaluate(current))
                row["seconds"] = round(time.monotonic() - started, 2)
                self.rows.append(row)
                self.track(row)
                self.say(INFO, f"round {round_} done\n{rounds_table(self.rows)}")
        if not self.rows:
            self.say(INFO, f"every round of {self.layout.root} is done (round {current.manifest.round})")
        return self.rows

    def track(self, row: dict[str, Any]) -> None:
        """The round's row to the trackers, under simulate's names (and aggregate's ``round/clients`` and
        ``round/server_epsilon``). Under DP-SGD the updates carry no loss, so the row has none; the recipe's privacy
        section drops it all the same."""
        metrics = tracking.round_metrics(row, private=self.recipe.privacy is not None)
        metrics.update({f"round/{key}": float(row[key]) for key in ("clients", "server_epsilon")
                        if row[key] is not None})
        self.trackers.log_round(row["round"], metrics)

    def start(self) -> Global:
        """The newest global checkpoint of the run folder, or a new round-0 one."""
        done = self.layout.global_checkpoints()
        if done:
            current = Global.of(done[-1])
            self.say(INFO, f"resuming {self.layout.root} after round {current.manifest.round}")
            return current
        from fedlora_cli.data import partition as partitions

        part = None
        if (self.layout.data / partitions.PARTITION_MANIFEST).is_file():
            part = partitions.read_manifest(self.layout.data)
        self.say(INFO, f"writing the round-0 global checkpoint of {self.recipe.name} in {self.layout.root}")
        return federation.init(self.recipe, self.layout.global_checkpoint(0), partition=part,
                               bench=self.bench(federation.task_labels(self.recipe, part)[1]))

    def bench(self, num_labels: int | None) -> Any:
        """The coordinator's own workbench (round 0 and evaluation), loaded once."""
        if self._bench is None:
            from fedlora_cli.model.workbench import build

            self._bench = build(self.recipe, num_labels, self.settings.base)
        return self._bench

    # -- one round -------------------------------------------------------------------------------------------
    def round(self, g: Global) -> tuple[Global, dict[str, Any]]:
        r, f = g.manifest.round + 1, self.recipe.federation
        online = set(self.grid.get_node_ids())
        self.identify(g, online)
        node_of = {cid: node for node, cid in self.clients.items() if node in online}
        if f.clients_per_round is not None:
            asked = sampled_clients(f, self.recipe.training.seed, r)
        elif f.client_ids:
            asked = list(f.client_ids)
        else:
            asked = sorted(node_of)
        done = [c for c in asked if self._has_update(r, c, g)]
        to_send = [c for c in asked if c not in done and c in node_of]
        for cid in asked:
            if cid not in done and cid not in node_of:
                self.say(WARNING, f"round {r}: client '{cid}' has no SuperNode online; left out")
        if done:
            self.say(INFO, f"round {r}: updates of {', '.join(done)} already in the run folder; not asked again")
        if len(done) + len(to_send) < f.min_clients:
            raise FedloraError(
                f"round {r}: {len(done) + len(to_send)} of the {len(asked)} client(s) asked are online or done, fewer "
                f"than federation.min_clients = {f.min_clients}; nothing written"
            )
        received, wire = self.collect(g, {c: node_of[c] for c in to_send})
        got = [c for c in asked if c in done or c in received]
        staging = self.layout.root / STAGING_DIR / round_dirname(r)
        try:
            if len(got) < f.min_clients:
                raise FedloraError(
                    f"round {r}: {len(got)} client update(s) of {len(asked)} asked, fewer than "
                    f"federation.min_clients = {f.min_clients}; nothing written"
                )
            for cid, path in received.items():
                final = self.layout.update(r, cid)
                if final.exists():
                    shutil.rmtree(final)
                final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self.say(INFO, f"round {r}: aggregating {len(got)} client update(s): {', '.join(got)}")
        result = federation.aggregate_round(g, [self.layout.update(r, c) for c in got], self.layout.global_checkpoint(r))
        rows = result.clients
        total, uploaded = sum(row.num_examples for row in rows), sum(row.bytes for row in rows)
        losses = [row.loss for row in rows]
        # DP-SGD, as simulate's rows: the largest cumulative epsilon a client has spent so far.
        privacy = [storage.read_update(self.layout.update(r, c)).manifest.privacy for c in got]
        return result.checkpoint, {
            "round": r, "asked": len(asked), "clients": len(got), "left_out": [c for c in asked if c not in got],
            "train_loss": None if None in losses else sum(row.loss * row.num_examples for row in rows) / total,
            "upload_bytes": uploaded, "upload_bytes_per_client": uploaded // len(rows),
            "wire_bytes": wire, "epsilon": max(p["epsilon"] for p in privacy) if privacy[0] else None,
            "server_epsilon": result.server_epsilon,
        }

    def identify(self, g: Global, online: set[int]) -> None:
        """Ask each new node who it is; refuse a site with another base model, an unknown or a taken client id."""
        new = sorted(n for n in online if n not in self.clients and n not in self.refused)
        if not new:
            return
        r, f = g.manifest.round + 1, self.recipe.federation
        text = (g.path / storage.GLOBAL_MANIFEST).read_text()
        content = {messages.QUERY: ConfigRecord({messages.MANIFEST_KEY: text})}
        sent = [Message(RecordDict(content), node, MessageType.QUERY, group_id=f"round-{r}",
                        ttl=self.settings.query_timeout) for node in new]
        members = set(population(f)) if f.client_ids or f.clients_per_round is not None else None
        answered = set()
        for reply in self.grid.send_and_receive(sent, timeout=self.settings.query_timeout):
            node = reply.metadata.src_node_id
            answered.add(node)
            if reply.has_error():
                self.say(WARNING, f"node {node}: no answer to who it is ({_flower_error(reply)}); asked again next round")
                continue
            answer = reply.content.get(messages.REPLY) or ConfigRecord()
            cid = str(answer.get(CLIENT_ID, ""))
            refusal = None
            if messages.ERROR_KEY in answer:
                refusal = str(answer[messages.ERROR_KEY])
            elif answer.get("base-fingerprint") != g.manifest.base_fingerprint:
                refusal = (f"its base model (fingerprint {answer.get('base-fingerprint')}) is not the federation's "
                           f"({g.manifest.base_fingerprint})")
            elif members is not None and cid not in members:
                refusal = "it is not one of the federation's clients (federation.client_ids, or client-0..N-1)"
            elif cid in self.clients.values():
                refusal = f"node {next(n for n, c in self.clients.items() if c == cid)} is already client '{cid}'"
            if refusal is not None:
                self.refused.add(node)
                self.say(WARNING, f"site '{cid or '?'}' (node {node}) refused: {refusal}; it will not be asked to train")
                continue
            self.clients[node] = cid
            self.say(INFO, f"site '{cid}' is node {node} ({answer.get('site', '')})")
        for node in sorted(set(new) - answered):
            self.say(WARNING, f"node {node}: no answer to who it is within {self.settings.query_timeout:g} s; "
                              "asked again next round")

    def collect(self, g: Global, nodes: dict[str, int]) -> tuple[dict[str, Path], int]:
        """Send the global to each client's node; the updates that arrived in time and passed every check (staged
        under RUN/.flower-staging), and the bytes they took."""
        r = g.manifest.round + 1
        if not nodes:
            return {}, 0
        records = transport.pack(g.path, messages.GLOBAL)
        sent = [Message(RecordDict(dict(records)), node, MessageType.TRAIN, group_id=f"round-{r}",
                        ttl=self.settings.round_timeout) for node in nodes.values()]
        self.say(INFO, f"round {r}: sending the global checkpoint to {', '.join(nodes)} "
                       f"({transport.wire_bytes(sent[0].content, messages.GLOBAL)} bytes each)")
        client_of = {node: cid for cid, node in nodes.items()}
        staging = self.layout.root / STAGING_DIR / round_dirname(r)
        received: dict[str, Path] = {}
        wire = 0
        replies = self.grid.send_and_receive(sent, timeout=self.settings.round_timeout)
        replied = set()
        for reply in replies:
            cid = client_of.get(reply.metadata.src_node_id)
            if cid is None:
                continue
            replied.add(cid)
            if reply.has_error():
                self.say(WARNING, f"round {r}: client '{cid}' failed ({_flower_error(reply)}); left out")
                continue
            answer = reply.content.get(messages.REPLY) or ConfigRecord()
            if messages.ERROR_KEY in answer:
                self.say(WARNING, f"round {r}: client '{cid}' did not train: {answer[messages.ERROR_KEY]}; left out")
                continue
            try:
                path = transport.unpack(reply.content, messages.UPDATE, staging / cid, overwrite=True)
                update = check_update(g, path)
                if update.manifest.client_id != cid:
                    raise FedloraError(f"it says it is from client '{update.manifest.client_id}'")
            except FedloraError as exc:
                shutil.rmtree(staging / cid, ignore_errors=True)
                self.say(WARNING, f"round {r}: update of client '{cid}' refused: {first_line(exc)}; left out")
                continue
            received[cid] = path
            wire += transport.wire_bytes(reply.content, messages.UPDATE)
            if answer.get(messages.RESENT_KEY):
                self.say(INFO, f"round {r}: client '{cid}' sent again the update it had made (not trained again)")
        for cid in nodes:
            if cid not in replied:
                self.say(WARNING, f"round {r}: client '{cid}' sent no reply within {self.settings.round_timeout:g} s; "
                                  "left out")
        return received, wire

    def _has_update(self, round_: int, client_id: str, g: Global) -> bool:
        path = self.layout.update(round_, client_id)
        if not path.is_dir():
            return False
        try:
            return storage.read_update(path).manifest.parent_digest == g.manifest.digest
        except FedloraError:
            return False

    # -- evaluation ------------------------------------------------------------------------------------------
    def evaluate(self, g: Global) -> dict[str, Any]:
        """Evaluate the new global (test data on this host; each site's own with client-evaluation); the
        round's metrics file as simulate writes it, and the numbers for the table."""
        from fedlora_cli.data import partition as partitions
        from fedlora_cli.federation.simulate import accuracy_of

        r = g.manifest.round
        test = self.settings.test
        if test is None and (self.layout.data / partitions.TEST_SHARD).is_file():
            test = str(self.layout.data / partitions.TEST_SHARD)
        metrics: dict[str, Any] = {"round": r}
        if test is not None:
            metrics["global"] = federation.evaluate(g, test, base_override=self.settings.base, bench=self.bench(g.manifest.num_labels))
        if self.settings.client_evaluation:
            metrics["sites"] = self.evaluate_at_sites(g)
        if len(metrics) > 1:
            path = self.layout.metrics(r)
            path.parent.mkdir(parents=True, exist_ok=True)
            with storage.atomic_file(path) as tmp:
                write_json(tmp, metrics)
        glob = metrics.get("global")
        return {"global_accuracy": accuracy_of(glob) if glob else None, "global_loss": glob["loss"] if glob else None,
                "global_macro_f1": glob.get("macro_f1") if glob else None}

    def evaluate_at_sites(self, g: Global) -> dict[str, dict[str, float]]:
        from flwr.app import MetricRecord

        online = set(self.grid.get_node_ids())
        nodes = {cid: node for node, cid in self.clients.items() if node in online}
        records = transport.pack(g.path, messages.GLOBAL)
        sent = [Message(RecordDict(dict(records)), node, MessageType.EVALUATE, group_id=f"round-{g.manifest.round}",
                        ttl=self.settings.round_timeout) for node in nodes.values()]
        client_of = {node: cid for cid, node in nodes.items()}
        out: dict[str, dict[str, float]] = {}
        for reply in self.grid.send_and_receive(sent, timeout=self.settings.round_timeout):
            cid = client_of.get(reply.metadata.src_node_id)
            if cid is None or reply.has_error():
                continue
            answer = reply.content.get(messages.REPLY) or ConfigRecord()
            if messages.ERROR_KEY in answer:
                self.say(WARNING, f"client '{cid}' did not evaluate: {answer[messages.ERROR_KEY]}")
                continue
            found = reply.content.get(messages.METRICS)
            if isinstance(found, MetricRecord):
                out[cid] = {k: float(v) for k, v in found.items() if isinstance(v, (int, float))}
        return out


def _flower_error(reply: Message) -> str:
    reason = first_line(Exception(reply.error.reason or "")) if reply.error.reason else "no reason given"
    return f"Flower error {reply.error.code}: {reason}"


def rounds_table(rows: list[dict[str, Any]]) -> str:
    """The rounds so far as a text table (the server's log is text)."""
    from io import StringIO

    from rich.console import Console
    from rich.table import Table

    def fmt(value: Any, spec: str = ".4f") -> str:
        return "-" if value is None else format(value, spec)

    table = Table("round", "clients", "left out", "train loss", "global acc", "global loss", "upload B", "wire B",
                  "seconds")
    for row in rows:
        table.add_row(str(row["round"]), f"{row['clients']}/{row['asked']}", ", ".join(row["left_out"]) or "-",
                      fmt(row["train_loss"]), fmt(row["global_accuracy"]), fmt(row["global_loss"]),
                      str(row["upload_bytes"]), str(row["wire_bytes"]), fmt(row["seconds"], ".1f"))
    console = Console(file=StringIO(), width=120, color_system=None)
    console.print(table)
    return console.file.getvalue().rstrip()


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    try:
        Coordinator(grid, Settings.from_run_config(context.run_config)).run()
    except FedloraError as exc:
        # One line that says what went wrong; Flower then marks the run finished:failed (flwr list shows it).
        _say(ERROR, str(exc))
        raise
