"""The round-0 global checkpoint: the adapter with its seeded random A and zero B, and the calibrated DP noise."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from fedlora_cli import privacy, recipe as recipes, storage
from fedlora_cli.adapters.methods import plan as make_plan
from fedlora_cli.errors import FedloraError
from fedlora_cli.federation.common import Global, digests, frozen_digest
from fedlora_cli.model.workbench import Workbench, build
from fedlora_cli.storage.manifests import GlobalManifest


def init(
    recipe: recipes.Recipe,
    out: Path,
    partition: dict[str, Any] | None = None,
    base_override: str | None = None,
    bench: Workbench | None = None,
    overwrite: bool = False,
) -> Global:
    """Write the round-0 global checkpoint: the adapter with its seeded random A and zero B; returns it.

    ``partition`` (a partition manifest) gives the label names and, for a recipe with a privacy budget, the
    client dataset sizes the DP-SGD noise is calibrated for.
    """
    if partition is not None and partition.get("task", recipes.TASK_CLASSIFICATION) != recipe.model.task:
        raise FedloraError(
            f"the partition was made for task '{partition.get('task', recipes.TASK_CLASSIFICATION)}' but recipe key "
            f"'model.task' is '{recipe.model.task}': partition again with this recipe"
        )
    label_names, num_labels = task_labels(recipe, partition)
    out = Path(out)
    if out.exists() and not overwrite:
        raise FedloraError(f"{out} already exists (pass --overwrite to replace it)")
    # The pooling is read from the folder the model is loaded from (a given workbench's, or the override's).
    location = bench.base_location if bench is not None else base_override
    recipe, pooling_source = with_pooling(calibrated(recipe, partition), location)
    if bench is None:
        bench = build(recipe, num_labels, base_override)
    if bench.pooling != recipe.model.pooling:
        raise FedloraError(f"the model was built with pooling '{bench.pooling}', the federation reads "
                           f"'{recipe.model.pooling}'")
    plan = make_plan(recipe.federation.method, recipe.federation.head, recipe.adapter.kind)
    tensors = bench.adapter_tensors()
    tensor_digests = digests(tensors)
    manifest = GlobalManifest(
        round=0,
        method=recipe.federation.method,
        head=recipe.federation.head,
        adapter_kind=recipe.adapter.kind,
        base_model=recipe.model.base,
        base_fingerprint=bench.fingerprint,
        recipe=recipe.to_dict(),
        recipe_digest=recipe.digest(),
        seed=recipe.training.seed,
        num_labels=num_labels,
        label_names=label_names,
        tensor_digests=tensor_digests,
        digest=storage.global_digest(tensor_digests),
        frozen_digest=frozen_digest(plan, tensor_digests),
        pooling_source=pooling_source,
    )
    written = storage.write_global(out, manifest, tensors, bench.adapter_config(), overwrite=overwrite)
    return Global.written(written, recipe, tensors, {})


def task_labels(recipe: recipes.Recipe, partition: dict[str, Any] | None) -> tuple[list[str] | None, int | None]:
    """Label names and number of classes of a sequence-classification federation; (None, None) for causal-lm.

    Without a partition the recipe's ``data.labels`` name them (partition numbers labels in that order), so a
    coordinator that never sees the sites' data (the Flower server app) can write round 0.
    """
    if recipe.model.task == recipes.TASK_CAUSAL_LM:
        return None, None
    if partition is not None:
        label_names = partition["label_names"]
    else:
        label_names = [str(name) for name in recipe.data.labels] if recipe.data.labels else None
    num_labels = recipe.model.num_labels or (len(label_names) if label_names else None)
    if num_labels is None:
        raise FedloraError(
            "the number of labels is unknown: set model.num_labels or data.labels, or pass a partition folder"
        )
    if label_names is not None and len(label_names) != num_labels:
        raise FedloraError(f"model.num_labels is {num_labels} but the partition has {len(label_names)} labels")
    return label_names, num_labels


def with_pooling(recipe: recipes.Recipe, base_override: str | None = None) -> tuple[recipes.Recipe, str]:
    """The recipe with ``model.pooling`` resolved (``auto``: from the base model's own files, see
    :mod:`fedlora_cli.model.pooling_choice`), and where the choice came from. The round-0 global checkpoint records
    both: the pooling is part of what the federation computes, so every client reads the model the same way."""
    from fedlora_cli.model.pooling_choice import choose
    from fedlora_cli.recipe.loading import resolve_location

    choice = choose(recipe.model, resolve_location(base_override or recipe.model.base))
    return dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, pooling=choice.pooling)), choice.source


def calibrated(recipe: recipes.Recipe, partition: dict[str, Any] | None) -> recipes.Recipe:
    """The recipe with ``privacy.noise_multiplier`` filled in from ``privacy.target_epsilon`` when unset and the
    federation shares one sigma (``privacy.calibration: federation``); with a partition, ``privacy.delta`` checked
    below 1/n for every client's n examples either way. Under ``calibration: client`` the recipe is returned as
    it is: each client calibrates its own sigma when it trains."""
    p = recipe.privacy
    if p is not None and partition is not None:
        # Known here, before any training: a client with delta >= 1/n would be refused only at train-client.
        for c in partition["clients"]:
            privacy.check_delta(p.delta, c["examples"], f"client '{c.get('id', '?')}'")
    if p is None or p.noise_multiplier is not None or p.calibration == "client":
        return recipe
    if partition is None:
        raise FedloraError(
            "privacy.target_epsilon needs the clients' dataset sizes to calibrate the noise: pass the partition "
            "folder (--data), set privacy.noise_multiplier, or let each client calibrate its own "
            "(privacy.calibration: client)"
        )
    t = recipe.training
    plans = [privacy.client_plan(c["examples"], t.batch_size, t.local_steps, t.local_epochs) for c in partition["clients"]]
    sigma = privacy.calibrate_noise(p, plans, recipe.federation.rounds)
    return dataclasses.replace(recipe, privacy=dataclasses.replace(p, noise_multiplier=sigma))

