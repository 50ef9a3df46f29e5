"""The federated round from the coordinator's side, once for every way a federation runs.

A round t takes global checkpoint t-1 to global checkpoint t, in a run folder (:class:`RunLayout`):

1. who is asked: every client of the federation, or the recipe's seeded sample (:mod:`.sampling`);
2. whose update is already in the run folder, made from this very parent (a resumed round asks nobody twice);
3. the others are asked through :class:`Sites`, the one thing that differs between deployments: in this process
   (:class:`InProcessSites`, ``fedlora simulate``) or by Flower messages (``fedlora_cli.flower.server_app``);
4. the participation rule (:func:`.sampling.require_enough`: at least ``federation.min_clients`` updates, under
   secure aggregation at least its ``reconstruction_threshold``; a Poisson sample short of it is skipped, or under
   DP-FedAvg released as it is, :func:`.sampling.needed`);
5. aggregation (:func:`.server.aggregate_round`: validation, the strategy, DP-FedAvg, server optimisers) into
   the global checkpoint;
6. evaluation: the global on the test data and the validation data the coordinator holds, and whatever the sites
   evaluate (each client's personalised model), into ``RUN/metrics/round-NNN.json`` (validation scores under
   ``validation``, with the same keys);
7. the round's row (:func:`round_row`), from the files the round wrote, so a resumed round's row is the same.

Everything is written atomically and a re-run skips what is complete: an interrupted federation resumes at the
first missing client update or global checkpoint, whichever way it runs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from fedlora_cli import recipe as recipes, storage
from fedlora_cli.errors import FedloraError
from fedlora_cli.federation.client import existing_update, site_round
from fedlora_cli.federation.common import Global
from fedlora_cli.federation.evaluate import evaluate as evaluate_checkpoint
from fedlora_cli.federation.init import init
from fedlora_cli.federation.sampling import asked as sampled_clients, fewest_named, needed, require_enough
from fedlora_cli.federation.secure import MANIFEST_KEY, SecureSum
from fedlora_cli.federation.server import SKIPPED, aggregate_round, aggregate_secure, check_update
from fedlora_cli.storage.checkpoints import round_dirname
from fedlora_cli.storage.files import read_json, write_json
from fedlora_cli.storage.run_layout import RECIPE_FILE, RunLayout

if TYPE_CHECKING:
    from fedlora_cli.model.workbench import Workbench

# The key of a round's metrics (and the prefix of a round row's keys) under which the validation split's scores are.
VALIDATION = "validation"
# Where updates that arrived over a network wait until the round has enough of them (RUN/.staging/round-NNN).
STAGING_DIR = ".staging"


@dataclass
class Collected:
    """The client updates a round's :meth:`Sites.train` obtained."""

    updates: dict[str, Path]  # client id -> its update folder: in the run folder already, or staged
    wire_bytes: int | None = None  # bytes the updates took on the network (None in process)
    # Secure aggregation: no update at all, only the unmasked weighted mean, who took part and their weights.
    secure: SecureSum | None = None

    @property
    def clients(self) -> list[str]:
        return list(self.updates) + (self.secure.clients if self.secure is not None else [])


class Sites(Protocol):
    """How the coordinator reaches the clients: the part of a round that differs between deployments."""

    def reachable(self, g: Global, clients: list[str]) -> list[str]:
        """Which of ``clients`` can be asked to train the round after ``g`` now (online, known)."""
        ...

    def train(self, g: Global, clients: list[str], staging: Path) -> Collected:
        """Ask each client for its update of the round after ``g``; those that came back and passed every check.
        Updates that are not written into the run folder directly are staged under ``staging``."""
        ...

    def evaluate(self, g: Global) -> dict[str, Any]:
        """What the sites evaluate of ``g`` (entries of the round's metrics file beside ``global``)."""
        ...

    def kept_loss(self, round_: int, client_id: str) -> float | None:
        """A client's training loss of the round when its update leaves it out (DP-SGD), if this side can see it."""
        ...


class Reporter(Protocol):
    """What a federation tells its caller: the CLI renders it with rich, the Flower server app logs it."""

    def stage(self, text: str) -> None: ...

    def warn(self, text: str) -> None: ...

    def round_done(self, row: dict[str, Any]) -> None: ...


class InProcessReporter(Reporter, Protocol):
    """A reporter that also shows each client's training as it happens in this process (``simulate``)."""

    def training(self, round_: int, client_id: str) -> Callable[[int, int, float], None] | None:
        """A progress callback (steps done, steps in all, loss) for one client's round."""
        ...

    def done_training(self) -> None: ...


def pin_recipe(recipe: recipes.Recipe, layout: RunLayout) -> None:
    """Pin the run folder to this recipe: a resumed run must be the same federation."""
    layout.root.mkdir(parents=True, exist_ok=True)
    recipe_file = layout.root / RECIPE_FILE
    if recipe_file.exists():
        previous = recipes.load(recipe_file)
        if previous.digest() != recipe.digest():
            raise FedloraError(
                f"{layout.root} holds a run of a different recipe ({recipe_file}); use another --out or --overwrite"
            )
        return
    with storage.atomic_file(recipe_file) as tmp:
        tmp.write_text(recipes.dump(recipe))


class Benches:
    """The coordinator's workbenches, one per LoRA rank in use (clients of other ranks, ``adapter.client_ranks``,
    need other adapters on the same base model), each loaded once with its own copy of the base model."""

    def __init__(self, recipe: recipes.Recipe, num_labels: int | None, base: str | None = None) -> None:
        self.recipe, self.num_labels, self.base = recipe, num_labels, base
        self._by_rank: dict[int, Workbench] = {}

    def get(self, client_id: str | None) -> Workbench:
        """The workbench of ``client_id``'s rank (None: the global rank)."""
        from fedlora_cli.model.workbench import build

        rank = self.recipe.adapter.rank_for(client_id)
        if rank not in self._by_rank:
            self._by_rank[rank] = build(self.recipe, self.num_labels, self.base, rank=rank)
        return self._by_rank[rank]


class TestData:
    """The coordinator's held-out data of one split (``test`` or ``validation``: a partition folder's split of that
    name, or any source ``fedlora evaluate`` reads), read once on first use; None when the coordinator holds none."""

    def __init__(self, source: Path | str | None, recipe: recipes.Recipe, num_labels: int | None,
                 split: str = "test") -> None:
        self.source, self.recipe, self.num_labels, self.split = source, recipe, num_labels, split
        self._examples: Any = None

    def examples(self, g: Global) -> Any:
        from fedlora_cli.data.examples import read_examples
        from fedlora_cli.federation.evaluate import held_out_path

        if self._examples is None and self.source is not None:
            self._examples = read_examples(held_out_path(self.source, self.split), self.recipe.data,
                                           self.recipe.model.task, self.num_labels, g.label_names)
        return self._examples


class Federation:
    """A federation's rounds over a run folder, with the clients reached through ``sites``."""

    def __init__(self, recipe: recipes.Recipe, layout: RunLayout, sites: Sites, reporter: Reporter, *,
                 benches: Benches, test: TestData, validation: TestData | None = None,
                 partition: Mapping[str, Any] | None = None) -> None:
        self.recipe, self.layout, self.sites, self.reporter = recipe, layout, sites, reporter
        self.benches, self.test, self.validation, self.partition = benches, test, validation, partition

    def start(self) -> Global:
        """The round-0 global checkpoint of the run folder, written now if it is not there."""
        path = self.layout.global_checkpoint(0)
        if path.is_dir():
            return Global.of(path)
        self.reporter.stage(f"writing the round-0 global checkpoint of {self.recipe.name} in {self.layout.root}")
        return init(self.recipe, path, partition=dict(self.partition) if self.partition else None,
                    bench=self.benches.get(None))

    def rounds(self) -> Iterator[dict[str, Any]]:
        """Run (or resume) every round of the recipe; yields each round's row as it is done."""
        current = self.start()
        done = len(self.layout.global_checkpoints()) - 1
        if done >= self.recipe.federation.rounds:
            self.reporter.stage(f"every round of {self.layout.root} is done (round {done})")
        elif done > 0:
            self.reporter.stage(f"resuming {self.layout.root} after round {done}")
        for round_ in range(1, self.recipe.federation.rounds + 1):
            target = self.layout.global_checkpoint(round_)
            started, ran = time.monotonic(), not target.is_dir()
            current, wire = self.round(current) if ran else (Global.of(target), None)
            metrics = self.evaluate(current)
            row = round_row(self.layout, current, metrics, self.partition, kept_loss=self.sites.kept_loss,
                            wire_bytes=wire, wall_seconds=time.monotonic() - started if ran else None)
            self.reporter.round_done(row)
            yield row

    def round(self, parent: Global) -> tuple[Global, int | None]:
        """One round from ``parent``: the new global checkpoint and the bytes its updates took on the network."""
        r, f = parent.manifest.round + 1, self.recipe.federation
        asked = sampled_clients(f, self.recipe.training.seed, r)
        need = needed(f, len(asked), self.recipe.server_privacy is not None)
        if not need:  # the sample is short of min_clients: skipped, or (DP-FedAvg, nobody asked) noise alone
            self.reporter.stage(f"round {r}: its sample asked {len(asked)} client(s), fewer than {fewest_named(f)}: "
                                + ("skipped, the global carried forward" if need is None else
                                   "a noise-only DP-FedAvg release"))
            return aggregate_round(parent, [], self.layout.global_checkpoint(r)).checkpoint, None
        done = [c for c in asked if existing_update(self.layout.update(r, c), parent, c) is not None]
        if done:
            self.reporter.stage(f"round {r}: updates of {', '.join(done)} already in the run folder; not asked again")
        reachable = self.sites.reachable(parent, [c for c in asked if c not in done])
        require_enough(f, r, len(done) + len(reachable), asked=len(asked), stage="reachable", need=need)
        staging = self.layout.root / STAGING_DIR / round_dirname(r)
        try:
            collected = self.sites.train(parent, reachable, staging) if reachable else Collected({})
            got = [c for c in asked if c in done or c in collected.clients]
            require_enough(f, r, len(got), asked=len(asked), stage="collected", need=need)
            for cid, path in collected.updates.items():
                _place(path, self.layout.update(r, cid))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            with contextlib.suppress(OSError):
                staging.parent.rmdir()  # gone when no other round is staging
        target = self.layout.global_checkpoint(r)
        if collected.secure is not None:
            self.reporter.stage(f"round {r}: the securely aggregated sum of {len(got)} client(s): {', '.join(got)}")
            written = aggregate_secure(parent, collected.secure, target).checkpoint
            clamped = collected.secure.tally.clamped
            if clamped:
                self.reporter.warn(clamped_warning(r, clamped, collected.secure.arithmetic.clipping_range))
            return written, collected.wire_bytes
        self.reporter.stage(f"round {r}: aggregating {len(got)} client update(s): {', '.join(got)}")
        result = aggregate_round(parent, [self.layout.update(r, c) for c in got], target)
        return result.checkpoint, collected.wire_bytes

    def evaluate(self, g: Global) -> dict[str, Any]:
        """The round's metrics file: read back when it is there, else the global on the test data and whatever the
        sites evaluate, written when there is anything."""
        round_ = g.manifest.round
        path = self.layout.metrics(round_)
        if path.is_file():
            return read_json(path, "round metrics")
        self.reporter.stage(f"round {round_}: evaluating")
        metrics: dict[str, Any] = {"round": round_}
        examples = self.test.examples(g)
        if examples is not None:
            metrics["global"] = evaluate_checkpoint(g, bench=self.benches.get(None), examples=examples)
        validation = self.validation.examples(g) if self.validation is not None else None
        if validation is not None:
            metrics[VALIDATION] = {"global": evaluate_checkpoint(g, bench=self.benches.get(None), examples=validation)}
        for key, value in self.sites.evaluate(g).items():
            # The sites' validation scores join the coordinator's under the same key.
            metrics[key] = {**metrics.get(key, {}), **value} if key == VALIDATION else value
        if len(metrics) > 1:
            path.parent.mkdir(parents=True, exist_ok=True)
            with storage.atomic_file(path) as tmp:
                write_json(tmp, metrics)
        return metrics


def _place(path: Path, final: Path) -> None:
    """A staged client update moved into the run folder (replacing a stale one); in place already: nothing."""
    if Path(path).resolve() == final.resolve():
        return
    if final.exists():
        shutil.rmtree(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(path, final)


class InProcessSites:
    """Every client trained in this process on its partition shard, its state in the run folder (``simulate``)."""

    def __init__(self, layout: RunLayout, clients: list[str], benches: Benches, test: TestData,
                 reporter: InProcessReporter, validation: TestData | None = None) -> None:
        self.layout, self.clients, self.benches, self.test, self.reporter = layout, clients, benches, test, reporter
        self.validation = validation

    def reachable(self, g: Global, clients: list[str]) -> list[str]:
        return clients

    def train(self, g: Global, clients: list[str], staging: Path) -> Collected:
        from fedlora_cli.data.partition import shard_name

        r = g.manifest.round + 1
        # Under secure aggregation an update never reaches the run folder: each is made in staging, turned into
        # the site's vector, and gone with the staging folder once the round has its emulated sum.
        secure = g.recipe.federation.secure_aggregation is not None
        out = {cid: (staging / cid) if secure else self.layout.update(r, cid) for cid in clients}
        for cid in clients:
            site_round(g, self.layout.data / shard_name(cid), self.layout.state(cid), out[cid], cid,
                       bench=self.benches.get(cid), progress=self.reporter.training(r, cid))
            self.reporter.done_training()
        if secure:
            return Collected({}, secure=emulated_sum(g, out))
        return Collected(out)

    def evaluate(self, g: Global) -> dict[str, Any]:
        """Each client's personalised model (the global at its rank plus its own state) on the test data (and on
        the validation data, under ``validation``), when the method keeps tensors at home or clients train other
        ranks."""
        round_, recipe = g.manifest.round, g.recipe
        if not (g.plan.local or recipe.adapter.client_ranks):
            return {}
        held = [c for c in self.clients if storage.latest_state(self.layout.state(c), round_ + 1) is not None]

        def personalised(examples: Any) -> dict[str, Any]:
            return {cid: evaluate_checkpoint(g, state_dir=self.layout.state(cid), client_id=cid,
                                             bench=self.benches.get(cid), examples=examples) for cid in held}

        metrics = {"personalised": personalised(self.test.examples(g))}
        validation = self.validation.examples(g) if self.validation is not None else None
        if validation is not None:
            metrics[VALIDATION] = {"personalised": personalised(validation)}
        return metrics

    def kept_loss(self, round_: int, client_id: str) -> float | None:
        path = self.layout.state(client_id) / round_dirname(round_) / storage.STATE_MANIFEST
        return read_json(path, "client state manifest").get("loss") if path.is_file() else None


def clamped_warning(round_: int, clamped: int, clipping_range: float) -> str:
    """The one line that says a secure round's sum is biased by SecAgg+'s clamp."""
    return (f"round {round_}: {clamped} value(s) of the sites' differences reached +-{clipping_range:g} and were "
            "clamped, which biases the sum toward zero; raise federation.secure_aggregation.clipping_range")


def emulated_sum(g: Global, updates: Mapping[str, Path]) -> SecureSum:
    """simulate's stand-in for SecAgg+: each site's vector (:func:`.secure.site_vector`), weighted, quantised and
    summed as integers without masks. It shows what the quantisation costs and provides no security."""
    from fedlora_cli.federation import secure

    arith = secure.Arithmetic.of(g.recipe)
    vectors = {cid: secure.site_vector(g, check_update(g, path), cid) for cid, path in updates.items()}
    names = next(iter(vectors.values())).names
    seed = g.recipe.training.seed * 1_000_003 + g.manifest.round + 1
    mean = secure.emulate(vectors, arith, seed)
    # The counts as the coordinator would receive them from each site, summed the same way.
    coordinates = sum(int(a.size) for a in mean)
    tally, expected = secure.Tally(), secure.expected_counts(g.recipe)
    for cid, v in sorted(vectors.items()):
        tally, _ = tally.add(v.counts(g.recipe), coordinates, cid, expected)  # the site's own counts: always valid
    return secure.SecureSum.of(names, mean, {cid: v.weight for cid, v in vectors.items()}, arith, emulated=True,
                               tally=tally)


def round_row(layout: RunLayout, g: Global, metrics: Mapping[str, Any], partition: Mapping[str, Any] | None, *,
              kept_loss: Callable[[int, str], float | None], wire_bytes: int | None = None,
              wall_seconds: float | None = None) -> dict[str, Any]:
    """The row of the round that wrote global checkpoint ``g``, from its manifest, its client updates and its
    metrics: the same whether the round ran now or before a restart (``wire_bytes`` and ``wall_seconds`` are only
    known for a round run now)."""
    m, round_ = g.manifest, g.manifest.round
    if MANIFEST_KEY in m.aggregation:
        return _secure_row(g, metrics, partition, wire_bytes, wall_seconds)
    updates = [storage.read_update(layout.update(round_, cid)).manifest for cid in m.clients]
    # Who the round asked: the recipe's population or its seeded sample, whoever was online (the manifest records it
    # only under sampling).
    asked = sampled_clients(g.recipe.federation, g.recipe.training.seed, round_)
    # Under DP-SGD the update omits the training loss (it is not noised); a side that holds the client's state
    # (simulate) reads it from there.
    losses = [u.loss if u.loss is not None else kept_loss(round_, u.client_id) for u in updates]
    total = sum(u.num_examples for u in updates)
    uploaded = sum(u.bytes for u in updates)
    spent = [u.privacy["epsilon"] for u in updates if u.privacy is not None]
    return {
        "round": round_, "asked": len(asked), "clients": len(updates),
        # A round whose sample asked fewer than min_clients, without DP-FedAvg: its global is its parent's.
        "skipped": (m.aggregation or {}).get("strategy") == SKIPPED,
        "left_out": [c for c in asked if c not in m.clients],
        "train_loss": None if None in losses or not total else
        sum(loss * u.num_examples for loss, u in zip(losses, updates)) / total,
        **_split_scores(metrics, partition),
        "upload_bytes": uploaded, "upload_bytes_per_client": uploaded // max(len(updates), 1), "wire_bytes": wire_bytes,
        "seconds": sum(u.seconds for u in updates),  # the clients' training time
        "wall_seconds": None if wall_seconds is None else round(wall_seconds, 2),
        # DP-SGD: the largest cumulative epsilon among the clients of this round (under sampling a client that sat
        # the round out may have spent more: see fedlora privacy report).
        "epsilon": max(spent) if spent else None,
        "server_epsilon": _server_epsilon(g),
        # The norm bound's clips (None without a bound); nothing is clamped outside secure aggregation.
        "clamped_values": None,
        "clipped_sites": len(m.aggregation["clipped"]) if (m.aggregation or {}).get("norm_bound") is not None else None,
        "counted_sites": None,
    }


def _secure_row(g: Global, metrics: Mapping[str, Any], partition: Mapping[str, Any] | None, wire_bytes: int | None,
                wall_seconds: float | None) -> dict[str, Any]:
    """The row of a securely aggregated round: the coordinator holds no update, so no per-client loss, bytes,
    training time or DP-SGD epsilon (each site keeps its own); who took part is in the manifest."""
    m, round_ = g.manifest, g.manifest.round
    asked = sampled_clients(g.recipe.federation, g.recipe.training.seed, round_)
    record = m.aggregation[MANIFEST_KEY]
    return {
        "round": round_, "asked": len(asked), "clients": len(m.clients),
        "skipped": (m.aggregation or {}).get("strategy") == SKIPPED,
        "left_out": [c for c in asked if c not in m.clients], "train_loss": None, **_split_scores(metrics, partition),
        "upload_bytes": wire_bytes, "upload_bytes_per_client": None if wire_bytes is None else wire_bytes // len(m.clients),
        "wire_bytes": wire_bytes, "seconds": None,
        "wall_seconds": None if wall_seconds is None else round(wall_seconds, 2),
        "epsilon": None, "server_epsilon": _server_epsilon(g),
        # The sites' counts, summed (secure.Tally): None where no site sends them (DP-FedAvg; clipped without a bound).
        "clamped_values": record.get("clamped_values"), "clipped_sites": record.get("clipped_sites"),
        "counted_sites": record.get("counted_sites"),  # the sites those totals cover (a bad count is left out)
    }


def _split_scores(metrics: Mapping[str, Any], partition: Mapping[str, Any] | None) -> dict[str, float | None]:
    """A row's scores: on the test split, and on the validation split as ``validation_<key>`` (every row has both
    sets of keys, a plain round's and a securely aggregated one's alike)."""
    validation = _scores(metrics.get(VALIDATION) or {}, partition)
    return {**_scores(metrics, partition),
            **{f"{VALIDATION}_{key}": value for key, value in validation.items() if key in VALIDATION_SCORES}}


def _scores(metrics: Mapping[str, Any], partition: Mapping[str, Any] | None) -> dict[str, float | None]:
    """The global model's scores and the mean of the personalised models' (each also on its client's label mix)."""
    from fedlora_cli.model import evaluation

    glob = metrics.get("global")
    personal = metrics.get("personalised") or {}
    accuracies = [accuracy_of(p) for p in personal.values()]
    # Each personalised model scored on the shared test split reweighted to its own client's label mix.
    mix = {c["id"]: c["label_counts"] for c in (partition or {}).get("clients", []) if "label_counts" in c}
    matched = [evaluation.accuracy_on_mix(p["class_recall"], mix[cid]) if "class_recall" in p and cid in mix else None
               for cid, p in personal.items()]
    return {
        "global_accuracy": accuracy_of(glob) if glob else None,
        "global_macro_f1": glob.get("macro_f1") if glob else None,
        "global_loss": glob["loss"] if glob else None,
        "personalised_accuracy": _mean(accuracies),
        "personalised_accuracy_own_mix": _mean(matched),
        "personalised_loss": _mean([p["loss"] for p in personal.values()]),
        # Flower's client-evaluation: the global as each site scored it on its own data, averaged over the sites.
        "sites_accuracy": _mean([_site_accuracy(s) for s in (metrics.get("sites") or {}).values()]),
    }


# The scores a round's row carries for the validation split too (as validation_<key>).
VALIDATION_SCORES = ("global_accuracy", "global_macro_f1", "global_loss", "personalised_accuracy",
                     "personalised_accuracy_own_mix", "sites_accuracy")


def _site_accuracy(scores: Mapping[str, float]) -> float | None:
    return scores.get("global.accuracy", scores.get("global.exact_match"))


def _mean(values: list[float | None]) -> float | None:
    return sum(values) / len(values) if values and None not in values else None


def _server_epsilon(g: Global) -> float | None:
    """DP-FedAvg: the client-level epsilon after the releases up to this global checkpoint."""
    m = g.manifest
    if not m.server_privacy_ledger:
        return None
    from fedlora_cli.privacy.accounting import server_epsilon

    return server_epsilon([tuple(e) for e in m.server_privacy_ledger], m.server_privacy_delta)


def accuracy_of(metrics: Mapping[str, Any]) -> float | None:
    """Classification accuracy, or a causal LM's exact-match accuracy (None when it generated nothing)."""
    return metrics["accuracy"] if "accuracy" in metrics else metrics.get("exact_match")
