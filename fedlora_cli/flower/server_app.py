"""The ServerApp (``[tool.flwr.app.components] serverapp``): fedlora's coordinator, with Flower carrying the folders.

The rounds are the one round engine's (:class:`fedlora_cli.federation.rounds.Federation`: who is asked, resume,
the participation rule, aggregation, evaluation, the round's row), over the run folder ``fedlora simulate``
writes (:class:`fedlora_cli.storage.RunLayout`) on the SuperLink host. What is Flower's is how the sites are
reached (:class:`FlowerSites`):

1. every SuperNode it does not know yet is asked who it is (a query: client id and base-model fingerprint); a
   site with another base model, a client id outside the federation (``federation.client_ids``, or
   client-0..N-1) or one another node already has is refused for the whole run;
2. the global checkpoint is sent to the clients the round asks that are online, and their updates are collected
   until ``round-timeout``;
3. each update is checked in full as it arrives (:func:`fedlora_cli.federation.server.check_update`): a bad one
   is refused with the client named, and the round goes on without it, as it does without a dead or late node;
4. with ``client-evaluation``, each site evaluates the new global (and its personalised model) on its own data.

The server logs each round's table and sends its row to the trackers ``report-to`` names (default: the recipe's
``tracking.report_to``) under the names ``fedlora simulate`` logs (:func:`fedlora_cli.tracking.round_metrics`), in
``RUN/tracking``; never the training loss of clients that train under DP-SGD (it stays with each client).

A restarted run starts after the newest global checkpoint, and within a round sends nothing to a client whose
update for it is already in the run folder. Settings come from the run config (``[tool.flwr.app.config]``,
written by ``fedlora flower app``; ``flwr run -c 'round-timeout=1200'`` overrides one); paths are on the
SuperLink host.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedlora_cli import recipe as recipes, tracking
from fedlora_cli.errors import FedloraError, first_line
from fedlora_cli.federation.common import Global
from fedlora_cli.federation.rounds import VALIDATION as ROUND_VALIDATION, Benches, Collected, Federation, TestData, pin_recipe
from fedlora_cli.federation.sampling import population
from fedlora_cli.federation.server import check_update
from fedlora_cli.flower import client_app as messages, transport
from fedlora_cli.flower.site import CLIENT_ID, VALIDATION_PREFIX
from fedlora_cli.storage.run_layout import RunLayout

# Run config keys ([tool.flwr.app.config]).
RECIPE, RUN_DIR, ROUND_TIMEOUT, QUERY_TIMEOUT, TEST, VALIDATION, BASE, CLIENT_EVALUATION, REPORT_TO = (
    "recipe", "run-dir", "round-timeout", "query-timeout", "test", "validation", "base", "client-evaluation",
    "report-to",
)


@dataclass(frozen=True)
class Settings:
    """The server app's settings (run config keys in brackets)."""

    recipe: Path  # [recipe] the recipe file on the SuperLink host
    run_dir: Path  # [run-dir] the run folder (RunLayout), created on the first run
    round_timeout: float = 900.0  # [round-timeout] seconds a round waits for its updates
    # [query-timeout] seconds a site has to say who it is: a fresh ClientApp process imports fedlora and reads the
    # base's files (a base without safetensors weights is loaded to be identified).
    query_timeout: float = 300.0
    test: str | None = None  # [test] test data on this host; default RUN/data/test.parquet when there is one
    # [validation] validation data on this host; default RUN/data/validation.parquet when there is one
    validation: str | None = None
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
                   validation=str(config[VALIDATION]) if config.get(VALIDATION) else None,
                   base=str(config[BASE]) if config.get(BASE) else None,
                   client_evaluation=bool(config.get(CLIENT_EVALUATION, False)),
                   report_to=str(config[REPORT_TO]) if config.get(REPORT_TO) else None)


def _say(level: int, text: str) -> None:
    log(level, "fedlora: %s", text)


class Coordinator:
    """The federation's rounds (:class:`fedlora_cli.federation.rounds.Federation`) with the sites reached over a
    Grid (Flower's, or any object with ``get_node_ids`` and ``send_and_receive``), reporting to Flower's log and
    the trackers."""

    def __init__(self, grid: Grid, settings: Settings, say: Callable[[int, str], None] = _say) -> None:
        self.settings, self.say = settings, say
        self.recipe = recipes.load(settings.recipe)
        self.layout = RunLayout(settings.run_dir)
        # An unknown tracker or a missing tracker package fails here, before round 0 is written.
        self.trackers = tracking.open_run(tracking.resolve(settings.report_to, self.recipe), self.layout.root,
                                          self.recipe.name)
        pin_recipe(self.recipe, self.layout)
        self.sites = FlowerSites(grid, settings, self.recipe, say)
        self.rows: list[dict[str, Any]] = []

    @property
    def clients(self) -> dict[int, str]:
        """Node id -> client id, from the sites' answers to who they are."""
        return self.sites.clients

    @clients.setter
    def clients(self, known: dict[int, str]) -> None:
        self.sites.clients = dict(known)

    def run(self) -> list[dict[str, Any]]:
        """Run (or resume) every round; one row per round, those done before a restart included."""
        from fedlora_cli.data import partition as partitions

        part = None
        if (self.layout.data / partitions.PARTITION_MANIFEST).is_file():
            part = partitions.read_manifest(self.layout.data)
        num_labels = federation_labels(self.recipe, part)
        held = {}
        for split, given in (("test", self.settings.test), ("validation", self.settings.validation)):
            shard = self.layout.data / partitions.HELD_OUT[split]
            source = given if given is not None else (str(shard) if shard.is_file() else None)
            held[split] = TestData(source, self.recipe, num_labels, split)
        benches = Benches(self.recipe, num_labels, self.settings.base)
        rounds = Federation(self.recipe, self.layout, self.sites, self, benches=benches, test=held["test"],
                            validation=held["validation"], partition=part)
        self.rows = []
        with self.trackers:
            for _ in rounds.rounds():
                pass  # each row is reported to round_done as its round ends
        return self.rows

    # -- the rounds' reporter ---------------------------------------------------------------------------------
    def stage(self, text: str) -> None:
        self.say(INFO, text)

    def warn(self, text: str) -> None:
        self.say(WARNING, text)

    def round_done(self, row: dict[str, Any]) -> None:
        """Log the table of rounds so far, and the round's row to the trackers, under simulate's names. Under DP-SGD
        the updates carry no loss, so the row has none; the recipe's privacy section drops it all the same."""
        self.rows.append(row)
        self.trackers.log_round(row["round"], tracking.round_metrics(row, private=self.recipe.privacy is not None))
        self.say(INFO, f"round {row['round']} done\n{rounds_table(self.rows)}")
        self.keep_rows()

    def keep_rows(self) -> None:
        """The rounds so far in the run folder, as ``simulate`` leaves them: RUN/metrics/rounds.json (the rows) and
        RUN/metrics/rounds.png (the learning curves), rewritten as each round ends."""
        from fedlora_cli import plots, storage

        self.layout.rounds.parent.mkdir(parents=True, exist_ok=True)
        with storage.atomic_file(self.layout.rounds) as tmp:
            storage.write_json(tmp, self.rows)
        plots.run_curves(self.rows, self.layout.curves, self.recipe)


def federation_labels(recipe: recipes.Recipe, partition: Mapping[str, Any] | None) -> int | None:
    from fedlora_cli.federation.init import task_labels

    return task_labels(recipe, dict(partition) if partition else None)[1]


class FlowerSites:
    """The clients as SuperNodes (:class:`fedlora_cli.federation.rounds.Sites`): each says who it is once (a query),
    then is sent the global checkpoint to train from, and its update is checked in full as it arrives."""

    def __init__(self, grid: Grid, settings: Settings, recipe: recipes.Recipe, say: Callable[[int, str], None]) -> None:
        self.grid, self.settings, self.recipe, self.say = grid, settings, recipe, say
        self.clients: dict[int, str] = {}  # node id -> client id, from the sites' answers
        self.refused: set[int] = set()

    def reachable(self, g: Global, clients: list[str]) -> list[str]:
        online = set(self.grid.get_node_ids())
        self.identify(g, online)
        known = {cid for node, cid in self.clients.items() if node in online}
        r = g.manifest.round + 1
        for cid in clients:
            if cid not in known:
                self.say(WARNING, f"round {r}: client '{cid}' has no SuperNode online; left out")
        return [c for c in clients if c in known]

    def identify(self, g: Global, online: set[int]) -> None:
        """Ask each new node who it is; refuse a site with another base model, an unknown or a taken client id."""
        from fedlora_cli import storage

        new = sorted(n for n in online if n not in self.clients and n not in self.refused)
        if not new:
            return
        text = (g.path / storage.GLOBAL_MANIFEST).read_text()
        content = {messages.QUERY: ConfigRecord({messages.MANIFEST_KEY: text})}
        sent = {node: Message(RecordDict(content), node, MessageType.QUERY, group_id=f"round-{g.manifest.round + 1}",
                              ttl=self.settings.query_timeout) for node in new}
        answered = self.exchange(sent, self.settings.query_timeout)
        for node, reply in answered.items():
            if reply.has_error():
                self.say(WARNING, f"node {node}: no answer to who it is ({_flower_error(reply)}); asked again next round")
                continue
            self.admit(node, reply.content.get(messages.REPLY) or ConfigRecord(), g, online)
        for node in sorted(set(new) - set(answered)):
            self.say(WARNING, f"node {node}: no answer to who it is within {self.settings.query_timeout:g} s; "
                              "asked again next round")

    def exchange(self, sent: Mapping[Any, Message], timeout: float) -> dict[Any, Message]:
        """Send the messages and wait up to ``timeout`` s; the replies, keyed as ``sent`` is (by node or client).

        A reply is matched to the message it answers, not to its sender: when a node is gone, Flower's
        NODE_UNAVAILABLE error reply comes from the SuperLink, and its reason must still reach the right client."""
        replies = self.grid.send_and_receive(list(sent.values()), timeout=timeout)
        # The Grid gives each message its id as it pushes it.
        key_of = {msg.metadata.message_id: key for key, msg in sent.items()}
        return {key_of[r.metadata.reply_to_message_id]: r for r in replies
                if r.metadata.reply_to_message_id in key_of}

    def admit(self, node: int, answer: ConfigRecord, g: Global, online: set[int]) -> None:
        """Take a node's answer to who it is: its client id, or a refusal for the whole run. A site that restarts
        without SuperNode authentication comes back as a new node: while the node that had its id is offline, the
        new one takes the id over."""
        cid = str(answer.get(CLIENT_ID, ""))
        gone = [n for n, c in self.clients.items() if c == cid and n not in online]
        for old in gone:
            del self.clients[old]
            self.say(INFO, f"site '{cid}' is back as node {node} (node {old} is gone)")
        refusal = None
        if messages.ERROR_KEY in answer:
            refusal = str(answer[messages.ERROR_KEY])
        elif answer.get("base-fingerprint") != g.manifest.base_fingerprint:
            refusal = (f"its base model (fingerprint {answer.get('base-fingerprint')}) is not the federation's "
                       f"({g.manifest.base_fingerprint})")
        elif cid not in population(self.recipe.federation):
            refusal = "it is not one of the federation's clients (federation.client_ids, or client-0..N-1)"
        elif cid in self.clients.values():
            refusal = f"node {next(n for n, c in self.clients.items() if c == cid)} is already client '{cid}'"
        if refusal is not None:
            self.refused.add(node)
            self.say(WARNING, f"site '{cid or '?'}' (node {node}) refused: {refusal}; it will not be asked to train")
            return
        self.clients[node] = cid
        self.say(INFO, f"site '{cid}' is node {node} ({answer.get('site', '')})")

    def train(self, g: Global, clients: list[str], staging: Path) -> Collected:
        """Send the global to each client's node; the updates that arrived in time and passed every check (staged),
        and the bytes they took."""
        r = g.manifest.round + 1
        node_of = {cid: node for node, cid in self.clients.items()}
        records = transport.pack(g.path, messages.GLOBAL)
        if self.recipe.federation.secure_aggregation is not None:
            return self.train_secure(g, {cid: node_of[cid] for cid in clients}, records)
        sent = [Message(RecordDict(dict(records)), node_of[cid], MessageType.TRAIN, group_id=f"round-{r}",
                        ttl=self.settings.round_timeout) for cid in clients]
        self.say(INFO, f"round {r}: sending the global checkpoint to {', '.join(clients)} "
                       f"({transport.wire_bytes(sent[0].content, messages.GLOBAL)} bytes each)")
        collected = Collected({}, 0)
        replied = self.exchange(dict(zip(clients, sent)), self.settings.round_timeout)
        for cid, reply in replied.items():
            self.receive(g, cid, reply, staging / cid, collected)
        for cid in clients:
            if cid not in replied:
                self.say(WARNING, f"round {r}: client '{cid}' sent no reply within {self.settings.round_timeout:g} s; "
                                  "left out")
        return collected

    def train_secure(self, g: Global, node_of: dict[str, int], records: Mapping[str, Any]) -> Collected:
        """The round through SecAgg+ (:mod:`.secure`): no update reaches this side, only the unmasked weighted
        mean, who took part and their weights; the bytes every reply of the four stages took."""
        from fedlora_cli.flower import secure

        r = g.manifest.round + 1
        self.say(INFO, f"round {r}: secure aggregation (SecAgg+) with {', '.join(node_of)}; sending the global "
                       f"checkpoint ({transport.wire_bytes(RecordDict(dict(records)), messages.GLOBAL)} bytes each)")
        grid = secure.Counting(self.grid)
        summed = secure.secure_round(grid, g, node_of, records, self.settings.round_timeout, self.say)
        self.say(INFO, f"round {r}: the sites' replies over the four SecAgg+ stages took {grid.received} bytes")
        return Collected({}, grid.received, secure=summed)

    def receive(self, g: Global, cid: str, reply: Message, folder: Path, collected: Collected) -> None:
        """One client's reply: its update unpacked into ``folder`` and checked in full, or left out by name."""
        r = g.manifest.round + 1
        failed = _failure(reply, "train")
        if failed is not None:
            self.say(WARNING, f"round {r}: client '{cid}' {failed}; left out")
            return
        answer = reply.content[messages.REPLY]
        try:
            path = transport.unpack(reply.content, messages.UPDATE, folder, overwrite=True)
            update = check_update(g, path)
            if update.manifest.client_id != cid:
                raise FedloraError(f"it says it is from client '{update.manifest.client_id}'")
        except FedloraError as exc:
            shutil.rmtree(folder, ignore_errors=True)
            self.say(WARNING, f"round {r}: update of client '{cid}' refused: {first_line(exc)}; left out")
            return
        collected.updates[cid] = path
        collected.wire_bytes += transport.wire_bytes(reply.content, messages.UPDATE)
        if answer.get(messages.RESENT_KEY):
            self.say(INFO, f"round {r}: client '{cid}' sent again the update it had made (not trained again)")

    def evaluate(self, g: Global) -> dict[str, Any]:
        """With client-evaluation, each site's own scores of the global (and of its personalised model) on its test
        data, and under ``validation`` on its own validation data when it names one."""
        if not self.settings.client_evaluation:
            return {}
        scores = self.evaluate_at_sites(g)
        prefix = VALIDATION_PREFIX
        metrics: dict[str, Any] = {"sites": {cid: {k: v for k, v in s.items() if not k.startswith(prefix)}
                                             for cid, s in scores.items()}}
        validation = {cid: {k[len(prefix):]: v for k, v in s.items() if k.startswith(prefix)} for cid, s in scores.items()}
        if any(validation.values()):
            metrics[ROUND_VALIDATION] = {"sites": {cid: s for cid, s in validation.items() if s}}
        return metrics

    def evaluate_at_sites(self, g: Global) -> dict[str, dict[str, float]]:
        from flwr.app import MetricRecord

        online = set(self.grid.get_node_ids())
        nodes = {cid: node for node, cid in self.clients.items() if node in online}
        records = transport.pack(g.path, messages.GLOBAL)
        sent = {cid: Message(RecordDict(dict(records)), node, MessageType.EVALUATE, group_id=f"round-{g.manifest.round}",
                             ttl=self.settings.round_timeout) for cid, node in nodes.items()}
        out: dict[str, dict[str, float]] = {}
        for cid, reply in self.exchange(sent, self.settings.round_timeout).items():
            failed = _failure(reply, "evaluate")
            if failed is not None:
                self.say(WARNING, f"client '{cid}' {failed}")
                continue
            found = reply.content.get(messages.METRICS)
            if isinstance(found, MetricRecord):
                out[cid] = {k: float(v) for k, v in found.items() if isinstance(v, (int, float))}
        return out

    def kept_loss(self, round_: int, client_id: str) -> float | None:
        return None  # a DP-SGD client's loss stays at its site


def _failure(reply: Message, doing: str) -> str | None:
    """Why a site's reply carries no result: Flower's error, or the site's own one-line refusal; None if it does."""
    if reply.has_error():
        return f"failed ({_flower_error(reply)})"
    answer = reply.content.get(messages.REPLY)
    if answer is None:
        return "failed (its reply carries no answer)"
    if messages.ERROR_KEY in answer:
        return f"did not {doing}: {answer[messages.ERROR_KEY]}"
    return None


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

    # Columns shown only where a round has them: the global's validation accuracy, the sites' own scores of the
    # global (client-evaluation) on their test and validation data, the
    # largest DP-SGD epsilon a site's update reports, DP-FedAvg's epsilon, the values SecAgg+ clamped.
    extra = [(key, label, spec) for key, label, spec in (("validation_global_accuracy", "val acc", ".4f"),
                                                         ("sites_accuracy", "sites acc", ".4f"),
                                                         ("validation_sites_accuracy", "sites val acc", ".4f"),
                                                         ("epsilon", "max eps", ".3f"),
                                                         ("server_epsilon", "server eps", ".3f"),
                                                         ("clamped_values", "clamped", "d"))
             if any(row[key] is not None for row in rows)]
    table = Table("round", "clients", "left out", "train loss", "global acc", "global loss", "upload B", "wire B",
                  "seconds", *(label for _, label, _ in extra))
    for row in rows:
        table.add_row(str(row["round"]), f"{row['clients']}/{row['asked']}", ", ".join(row["left_out"]) or "-",
                      fmt(row["train_loss"]), fmt(row["global_accuracy"]), fmt(row["global_loss"]),
                      fmt(row["upload_bytes"], "d"), fmt(row["wire_bytes"], "d"), fmt(row["wall_seconds"], ".1f"),
                      *(fmt(row[key], spec) for key, _, spec in extra))
    console = Console(file=StringIO(), width=120, color_system=None)
    console.print(table)
    return console.file.getvalue().rstrip()


app = ServerApp()


class _OneLine(logging.Filter):
    """Drops Flower's report of a :class:`FedloraError` the server app raised ("ServerApp raised an exception" and
    its traceback): fedlora has said what went wrong in one line already. Other exceptions keep their traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], FedloraError))


def _quiet_flower_traceback() -> None:
    from flwr.common.logger import FLOWER_LOGGER

    if not any(isinstance(f, _OneLine) for f in FLOWER_LOGGER.filters):
        FLOWER_LOGGER.addFilter(_OneLine())


@app.main()
def main(grid: Grid, context: Context) -> None:
    _quiet_flower_traceback()
    try:
        Coordinator(grid, Settings.from_run_config(context.run_config)).run()
    except FedloraError as exc:
        # One line that says what went wrong; Flower then marks the run finished:failed (flwr list shows it).
        _say(ERROR, str(exc))
        raise
