"""A whole federation on one machine, through the same functions a manual run calls.

It writes the folder tree a person running the federation by hand would write
(:class:`fedlora_cli.storage.RunLayout`), so the run can be inspected or continued with the individual subcommands.
Every folder is written atomically, and a re-run skips whatever is already complete: an interrupted run
resumes at the first client update or global checkpoint that is missing, and redoes nothing else.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from fedlora_cli import federation, recipe as recipes, storage
from fedlora_cli.data import partition as partitions
from fedlora_cli.errors import FedloraError
from fedlora_cli.federation.common import Global
from fedlora_cli.federation.sampling import asked as sampled_clients
from fedlora_cli.model import evaluation
from fedlora_cli.storage.checkpoints import round_dirname
from fedlora_cli.storage.files import read_json, write_json
from fedlora_cli.storage.run_layout import RECIPE_FILE, RunLayout


class Reporter(Protocol):
    """What the simulation tells its caller; the CLI renders it with rich."""

    def stage(self, text: str) -> None: ...

    def training(self, round_: int, client_id: str) -> Callable[[int, int, float], None]: ...

    def done_training(self) -> None: ...

    def round_done(self, row: dict[str, Any]) -> None: ...


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


def _update_is_current(layout: RunLayout, round_: int, client_id: str, parent_digest: str) -> bool:
    path = layout.update(round_, client_id)
    if not path.is_dir():
        return False
    try:
        update = storage.read_update(path)
    except FedloraError:
        return False
    state_round = layout.state(client_id) / round_dirname(round_)
    return update.manifest.parent_digest == parent_digest and state_round.is_dir()


def _evaluate_round(
    layout: RunLayout, g: Global, clients: list[str], benches: Benches, test_examples: Any, personalised: bool
) -> dict[str, Any]:
    round_ = g.manifest.round
    path = layout.metrics(round_)
    if path.is_file():
        return read_json(path, "round metrics")
    result: dict[str, Any] = {
        "round": round_, "global": federation.evaluate(g, bench=benches.get(None), examples=test_examples)
    }
    if personalised:
        per_client = {
            cid: federation.evaluate(
                g, state_dir=layout.state(cid), client_id=cid, bench=benches.get(cid), examples=test_examples
            )
            for cid in clients
            if storage.latest_state(layout.state(cid), round_ + 1) is not None
        }
        result["personalised"] = per_client
    path.parent.mkdir(parents=True, exist_ok=True)
    with storage.atomic_file(path) as tmp:
        write_json(tmp, result)
    return result


class Benches:
    """One workbench per LoRA rank in use: clients of different ranks (adapter.client_ranks) need different
    adapters on the same base model. Each holds its own copy of the base model."""

    def __init__(self, recipe: recipes.Recipe, num_labels: int | None) -> None:
        self.recipe, self.num_labels = recipe, num_labels
        self._by_rank: dict[int, Any] = {}

    def get(self, client_id: str | None) -> Any:
        from fedlora_cli.model.workbench import build

        rank = self.recipe.adapter.rank_for(client_id)
        if rank not in self._by_rank:
            self._by_rank[rank] = build(self.recipe, self.num_labels, rank=rank)
        return self._by_rank[rank]


def simulate(
    recipe: recipes.Recipe, out: Path, reporter: Reporter, overwrite: bool = False, keep_state_rounds: int | None = None
) -> list[dict[str, Any]]:
    """Run (or resume) every round of the recipe's federation under ``out``; returns one row per round.

    ``keep_state_rounds`` prunes each client's state to its newest rounds after every round (default: keep all),
    which bounds the run folder's growth to the global checkpoints and client updates.
    """
    from fedlora_cli.data.examples import read_examples

    layout = RunLayout(Path(out))
    _start(recipe, layout, overwrite)
    part, clients, num_labels = _partition(recipe, layout, reporter)
    from fedlora_cli.model.site import Site

    reporter.stage(f"loading base model {recipe.model.base} ({Site.of(recipe).describe()})")
    benches = Benches(recipe, num_labels)
    if layout.global_checkpoint(0).is_dir():
        current = Global.of(layout.global_checkpoint(0))
    else:
        current = federation.init(recipe, layout.global_checkpoint(0), partition=part, bench=benches.get(None))
    test_examples = read_examples(layout.data / partitions.TEST_SHARD, recipe.data, recipe.model.task, num_labels)
    # Clients of another rank than the global's use the global truncated to their rank: evaluate that too.
    personalised = bool(current.plan.local) or bool(recipe.adapter.client_ranks)
    rows = []
    for round_ in range(1, recipe.federation.rounds + 1):
        target = layout.global_checkpoint(round_)
        current = Global.of(target) if target.is_dir() else _run_round(layout, current, clients, benches, reporter)
        reporter.stage(f"round {round_}: evaluating")
        metrics = _evaluate_round(layout, current, clients, benches, test_examples, personalised)
        row = round_row(layout, round_, current.manifest.clients, metrics, part)
        if keep_state_rounds is not None:
            for cid in clients:
                storage.prune_states(layout.state(cid), keep_state_rounds)
        rows.append(row)
        reporter.round_done(row)
    return rows


def _start(recipe: recipes.Recipe, layout: RunLayout, overwrite: bool) -> None:
    if recipe.data.source is None:
        raise FedloraError("recipe key 'data.source' is required by simulate")
    if overwrite and layout.root.exists():
        import shutil

        # Only a run folder is deleted: --overwrite pointed at the wrong folder must not wipe it.
        if any(layout.root.iterdir()) and not (layout.root / RECIPE_FILE).is_file():
            raise FedloraError(f"{layout.root} is not a fedlora simulate run (no {RECIPE_FILE}); not overwriting it")
        shutil.rmtree(layout.root)
    pin_recipe(recipe, layout)


def _partition(recipe: recipes.Recipe, layout: RunLayout, reporter: Reporter) -> tuple[dict[str, Any], list[str], int | None]:
    """The run's partition (made on the first run), its client ids and the number of labels."""
    if not (layout.data / partitions.PARTITION_MANIFEST).is_file():
        reporter.stage(f"partitioning {recipe.data.source} across {recipe.federation.clients} clients")
        partitions.partition(recipe.data, recipe.federation.clients, layout.data, task=recipe.model.task)
    part = partitions.read_manifest(layout.data)
    clients = [c["id"] for c in part["clients"]]
    if len(clients) != recipe.federation.clients:
        raise FedloraError(
            f"the partition has {len(clients)} clients but recipe key 'federation.clients' is {recipe.federation.clients}"
        )
    if recipe.federation.client_ids is not None and list(recipe.federation.client_ids) != clients:
        raise FedloraError(
            "recipe key 'federation.client_ids' names other clients than the partition simulate writes "
            f"({', '.join(clients[:3])}, ...): leave it unset for a simulation"
        )
    _, num_labels = federation.task_labels(recipe, part)
    return part, clients, num_labels


def _run_round(layout: RunLayout, parent: Global, clients: list[str], benches: Benches, reporter: Reporter) -> Global:
    """Train every client this round asks whose update is missing, then aggregate; returns the new global."""
    round_ = parent.manifest.round + 1
    f = parent.recipe.federation
    if f.clients_per_round is not None:
        clients = sampled_clients(f, parent.recipe.training.seed, round_)
        if len(clients) < f.min_clients:
            raise FedloraError(
                f"round {round_}: Poisson sampling asked {len(clients)} client(s), fewer than federation.min_clients "
                f"= {f.min_clients}; lower min_clients or raise clients_per_round"
            )
    for cid in clients:
        if _update_is_current(layout, round_, cid, parent.manifest.digest):
            continue
        federation.train_client(
            parent,
            layout.data / partitions.shard_name(cid),
            layout.state(cid),
            layout.update(round_, cid),
            cid,
            bench=benches.get(cid),
            progress=reporter.training(round_, cid),
            overwrite=True,
        )
        reporter.done_training()
    reporter.stage(f"round {round_}: aggregating {len(clients)} client updates")
    updates = [layout.update(round_, cid) for cid in clients]
    return federation.aggregate_round(parent, updates, layout.global_checkpoint(round_)).checkpoint


def round_row(
    layout: RunLayout, round_: int, clients: list[str], metrics: dict[str, Any], partition: dict[str, Any] | None = None
) -> dict[str, Any]:
    updates = [storage.read_update(layout.update(round_, cid)).manifest for cid in clients]
    total = sum(u.num_examples for u in updates)
    # Under DP-SGD the update omits the training loss (it is not noised); the simulation, which holds every
    # client's state, reads it from there.
    losses = [u.loss if u.loss is not None else _state_loss(layout, round_, cid) for u, cid in zip(updates, clients)]
    personal = metrics.get("personalised") or {}
    personal_accuracy = [accuracy_of(m) for m in personal.values()]
    # Each personalised model scored on the shared test split reweighted to its own client's label mix.
    mix = {c["id"]: c["label_counts"] for c in (partition or {}).get("clients", []) if "label_counts" in c}
    matched = [
        evaluation.accuracy_on_mix(m["class_recall"], mix[cid]) if "class_recall" in m and cid in mix else None
        for cid, m in personal.items()
    ]
    return {
        "round": round_,
        "train_loss": None if None in losses else sum(loss * u.num_examples for loss, u in zip(losses, updates)) / total,
        "global_accuracy": accuracy_of(metrics["global"]),
        "global_macro_f1": metrics["global"].get("macro_f1"),
        "global_loss": metrics["global"]["loss"],
        "personalised_accuracy": (
            sum(personal_accuracy) / len(personal_accuracy)
            if personal_accuracy and None not in personal_accuracy else None
        ),
        "personalised_accuracy_own_mix": sum(matched) / len(matched) if matched and None not in matched else None,
        "personalised_loss": (
            sum(m["loss"] for m in personal.values()) / len(personal) if personal else None
        ),
        "upload_bytes": sum(u.bytes for u in updates),
        "upload_bytes_per_client": sum(u.bytes for u in updates) // len(updates),
        "seconds": sum(u.seconds for u in updates),
        # DP-SGD: the largest cumulative epsilon any client has spent so far.
        "epsilon": max(u.privacy["epsilon"] for u in updates) if updates[0].privacy else None,
    }


def _state_loss(layout: RunLayout, round_: int, client_id: str) -> float | None:
    path = layout.state(client_id) / round_dirname(round_) / storage.STATE_MANIFEST
    return read_json(path, "client state manifest").get("loss") if path.is_file() else None


def accuracy_of(metrics: dict[str, Any]) -> float | None:
    """Classification accuracy, or a causal LM's exact-match accuracy (None when it generated nothing)."""
    return metrics["accuracy"] if "accuracy" in metrics else metrics.get("exact_match")
