"""Evaluating a global checkpoint, or one client's personalised model (the global plus its client state)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedlora_cli import recipe as recipes, storage
from fedlora_cli.errors import FedloraError
from fedlora_cli.federation.client import check_state
from fedlora_cli.federation.common import Global, bench_for, load_client_model
from fedlora_cli.model import harness
from fedlora_cli.model.workbench import Workbench
from fedlora_cli.storage.manifests import GlobalManifest

if TYPE_CHECKING:
    from fedlora_cli.data.examples import CausalExamples, Examples


def load_for_evaluation(
    global_checkpoint: Path | Global,
    state_dir: Path | None = None,
    client_id: str | None = None,
    base_override: str | None = None,
    bench: Workbench | None = None,
    site: Mapping[str, Any] | None = None,
) -> tuple[Workbench, GlobalManifest]:
    """A workbench holding the global model, or one client's: the global at the client's rank plus its kept
    tensors, when ``state_dir`` is given. ``site`` overrides the recipe's site settings (device, precision)."""
    g = Global.of(global_checkpoint).verify()
    manifest = g.manifest
    state = None
    rank = None
    if state_dir is not None:
        if not Path(state_dir).is_dir():
            raise FedloraError(f"client state not found: {state_dir}")
        state = storage.latest_state(state_dir, before_round=manifest.round + 1)
        if state is None:
            raise FedloraError(f"client state {state_dir} holds no trained round up to round {manifest.round}")
        check_state(state, client_id or state.manifest.client_id, manifest)
        rank = g.recipe.adapter.rank_for(state.manifest.client_id)
    bench = bench_for(g, base_override, bench, rank, site)
    load_client_model(bench, g.plan, g.verified_tensors, state, g.verified_correction)
    bench.model.eval()
    return bench, manifest


def evaluate(
    global_checkpoint: Path | Global,
    test: Path | str | None = None,
    state_dir: Path | None = None,
    client_id: str | None = None,
    base_override: str | None = None,
    bench: Workbench | None = None,
    examples: Examples | CausalExamples | None = None,
    progress: Callable[[int, int], None] | None = None,
    settings: recipes.EvaluationSection | None = None,
    site: Mapping[str, Any] | None = None,
    split: str | None = None,
    lm_eval: harness.Request | None = None,
    held_out: str = "test",
) -> dict[str, Any]:
    """The task's metrics (:mod:`fedlora_cli.model.evaluation`) of the global model, or of one client's personalised
    model, on ``test`` data; and with ``lm_eval``, lm-evaluation-harness's scores of the same model on its tasks
    (:mod:`fedlora_cli.model.harness`, under the key ``lm_eval``). ``settings`` replaces the recipe's evaluation
    section (e.g. another ``max_new_tokens``).

    ``test`` is a partition folder (its ``held_out`` split: test or validation), a shard, or the site's own data as
    :func:`train_client` takes it. It is read, and the lm-eval tasks loaded with their data, before the model is loaded, so bad data or a bad
    task name fails at once. The model is loaded once for both.
    """
    from fedlora_cli.data.examples import read_examples
    from fedlora_cli.model import evaluation

    g = Global.of(global_checkpoint)
    if examples is None and test is not None:
        examples = read_examples(held_out_path(test, held_out), g.recipe.data, g.recipe.model.task, g.manifest.num_labels,
                                 g.label_names, split)
    if examples is None and lm_eval is None:
        raise FedloraError("no test data given, and no lm-eval task")
    tasks = None
    if lm_eval is not None:
        harness.check_task(g.recipe.model.task)
        tasks = harness.load(lm_eval)
    bench, manifest = load_for_evaluation(g, state_dir, client_id, base_override, bench, site)
    if settings is not None:
        bench = bench.for_recipe(dataclasses.replace(bench.recipe, evaluation=settings))
    result: dict[str, Any] = {"round": manifest.round, "personalised": state_dir is not None,
                              "task": bench.recipe.model.task}
    if examples is not None:
        result.update(evaluation.evaluate(bench, examples, progress))
    if tasks is not None:
        with bench.site.cpu_threads():
            result["lm_eval"] = harness.run(bench, tasks)
    return {**result, "site": bench.site.to_dict()}


def evaluate_splits(
    global_checkpoint: Path | Global, test: Path | str | None, validation: Path | str | None = None, *,
    split: str | None = None, **options: Any,
) -> dict[str, Any]:
    """:func:`evaluate` on ``test`` (a partition folder's test split, or any data), and on ``validation`` (default:
    the partition folder's validation split when it has one; a site may name its own data): the test metrics (and
    lm-eval's, with ``lm_eval``) with the validation ones under ``validation``, absent without validation data.
    Both are read before the model is loaded, which happens once; ``options`` as :func:`evaluate` takes them."""
    from fedlora_cli.data.examples import read_examples

    g = Global.of(global_checkpoint)
    if validation is None and test is not None:
        validation = validation_of(test)
    if validation is None:
        return evaluate(g, test, split=split, **options)
    if test is None:
        raise FedloraError("validation data without test data (--data)")

    def read(source: Path | str, held_out: str) -> Any:
        return read_examples(held_out_path(source, held_out), g.recipe.data, g.recipe.model.task,
                             g.manifest.num_labels, g.label_names, split)

    examples = {"test": read(test, "test"), "validation": read(validation, "validation")}
    bench = options.pop("bench", None)
    if bench is None:
        keep = {k: options[k] for k in ("state_dir", "client_id", "base_override", "site") if k in options}
        bench, _ = load_for_evaluation(g, **keep)
    scores = evaluate(g, examples=examples["test"], bench=bench, **options)
    options.pop("lm_eval", None)  # lm-eval's tasks have their own data: scored once
    return {**scores, "validation": evaluate(g, examples=examples["validation"], bench=bench, **options)}


def held_out_path(source: Path | str, split: str) -> Path | str:
    """A partition folder's held-out split ``split`` (``test`` or ``validation``); any other source as given.
    FedloraError for a partition folder without that split (one partitioned with no validation fraction)."""
    from fedlora_cli.data.partition import HELD_OUT, PARTITION_MANIFEST

    folder = Path(source)
    shard = folder / HELD_OUT[split]
    if shard.is_file() or not (folder / PARTITION_MANIFEST).is_file():
        return shard if shard.is_file() else source
    raise FedloraError(f"partition {folder} has no {split} split (partition it again with a {split} fraction)")


def validation_of(source: Path | str) -> Path | None:
    """A partition folder's validation split, None for a folder without one and for any other source."""
    from fedlora_cli.data.partition import VALIDATION_SHARD

    shard = Path(source) / VALIDATION_SHARD
    return shard if shard.is_file() else None
