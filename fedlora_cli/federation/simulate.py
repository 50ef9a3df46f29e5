"""A whole federation on one machine, through the same functions a manual run calls.

It partitions the data, then runs the rounds through the one round engine (:mod:`.rounds`) with every client
trained in this process (:class:`.rounds.InProcessSites`). It writes the folder tree a person running the
federation by hand would write (:class:`fedlora_cli.storage.RunLayout`), so the run can be inspected or continued
with the individual subcommands; a re-run resumes at the first client update or global checkpoint that is missing,
and redoes nothing else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedlora_cli import recipe as recipes, storage
from fedlora_cli.data import partition as partitions
from fedlora_cli.errors import FedloraError
from fedlora_cli.federation.init import task_labels
from fedlora_cli.federation.rounds import Benches, Federation, InProcessReporter, InProcessSites, TestData, pin_recipe
from fedlora_cli.storage.run_layout import RECIPE_FILE, RunLayout


# What the simulation tells its caller (the CLI renders it with rich): the rounds' reports and each client's training.
Reporter = InProcessReporter


def simulate(
    recipe: recipes.Recipe, out: Path, reporter: Reporter, overwrite: bool = False, keep_state_rounds: int | None = None
) -> list[dict[str, Any]]:
    """Run (or resume) every round of the recipe's federation under ``out``; returns one row per round.

    ``keep_state_rounds`` prunes each client's state to its newest rounds after every round (default: keep all),
    which bounds the run folder's growth to the global checkpoints and client updates.
    """
    layout = RunLayout(Path(out))
    _start(recipe, layout, overwrite)
    part, clients, num_labels = _partition(recipe, layout, reporter)
    from fedlora_cli.model.site import Site

    reporter.stage(f"loading base model {recipe.model.base} ({Site.of(recipe).describe()})")
    benches = Benches(recipe, num_labels)
    test = TestData(layout.data / partitions.TEST_SHARD, recipe, num_labels)
    # A partition made without a validation fraction (or before there was one) has no validation split.
    validation = layout.data / partitions.VALIDATION_SHARD
    validation = TestData(validation, recipe, num_labels, "validation") if validation.is_file() else None
    sites = InProcessSites(layout, clients, benches, test, reporter, validation)
    if recipe.federation.secure_aggregation is not None:
        reporter.warn("federation.secure_aggregation: simulate emulates SecAgg+'s arithmetic (clip, quantise, "
                      "weighted integer sum, dequantise) to show its cost; it provides no security itself (one "
                      "process sees every update). Secure aggregation runs on Flower: fedlora flower app")
    federation = Federation(recipe, layout, sites, reporter, benches=benches, test=test, validation=validation,
                            partition=part)
    rows = []
    for row in federation.rounds():
        if keep_state_rounds is not None:
            for cid in clients:
                storage.prune_states(layout.state(cid), keep_state_rounds)
        rows.append(row)
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
    _, num_labels = task_labels(recipe, part)
    return part, clients, num_labels
