"""Split a dataset across clients, with held-out test and validation splits for evaluation.

Strategies:

- ``iid``: a seeded shuffle dealt out in near-equal shards.
- ``dirichlet``: label skew. For every class, client proportions are drawn from Dirichlet(alpha) and that
  class's examples are split accordingly (Hsu et al. 2019; the convention of FedSA-LoRA's Dir(0.5) split).
  Draws are repeated (up to 100 times) until every client holds at least ``min_examples`` examples.
  Instruction data (``causal-lm``) has no labels: there the skew is over the values of a category column
  (``data.by``), e.g. the template a math problem came from.
- ``natural``: one client per distinct value of a column (a site, a user, a category).
- ``size``: IID content, unequal sizes: the proportions ``data.sizes``, or proportions drawn from
  Dirichlet(alpha) over the clients (retried until every client holds ``min_examples``).

These are written here rather than taken from flwr-datasets: its partitioners are what we would use, but its
0.6.1 release pins datasets<5 and rich<15, while fedlora needs datasets 5 and rich 15. The strategies are
small, seeded with numpy's PCG64 and tested directly.

Output folder::

    partition.json      task, strategy, seed, source, columns, per-client and test counts
    client-0.parquet    one shard per client: for sequence-classification the text column and an integer
    ...                 label column; for causal-lm the columns of the data's layout (data.format: prompt
    ...                 and response, messages, prompt and completion, or Alpaca's), answer and category
    test.parquet        the held-out test split, shared by every evaluation
    validation.parquet  the held-out validation split (``data.validation_fraction`` > 0): settings and the round
                        to export are chosen on it, so the test split stays a clean estimate

The manifest and the table are the same for both tasks: ``label_column`` names the column whose values are
counted per client (``label_names``, ``label_counts``): the label for sequence-classification; for causal-lm
the category column ``data.by`` when there is one, else nothing (``label_names`` is empty and only the
example counts are shown).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedlora_cli.data.sources import read_source
from fedlora_cli.errors import FedloraError
from fedlora_cli.recipe.schema import TASK_CAUSAL_LM, TASK_CLASSIFICATION, DataSection
from fedlora_cli.storage.files import atomic_dir, read_json, write_json

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

PARTITION_MANIFEST = "partition.json"
TEST_SHARD = "test.parquet"
VALIDATION_SHARD = "validation.parquet"
# The held-out splits a partition folder may hold, by the name evaluation reports them under.
HELD_OUT = {"test": TEST_SHARD, "validation": VALIDATION_SHARD}
MIN_EXAMPLES = 10


def shard_name(client_id: str) -> str:
    return f"{client_id}.parquet"


def client_ids(n: int) -> list[str]:
    return [f"client-{i}" for i in range(n)]


# --------------------------------------------------------------------------------------------------------
# Strategies: pure functions from labels to index lists


def split_test(n: int, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random hold-out: (train indices, test indices)."""
    order = rng.permutation(n)
    n_test = max(1, int(round(n * fraction)))
    return order[n_test:], order[:n_test]


def split_validation(train: np.ndarray, n: int, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """The validation hold-out, ``fraction`` of all ``n`` rows, from the training rows ``split_test`` left in random
    order: (train indices, validation indices). No further draw, so the test split and the random stream the
    clients are split with do not depend on it; 0 holds nothing out."""
    n_validation = int(round(n * fraction)) if fraction > 0 else 0
    if fraction > 0 and n_validation == 0:
        n_validation = 1
    if n_validation >= len(train):
        raise FedloraError(f"data.validation_fraction {fraction} of {n} rows leaves no row to train on")
    return train[n_validation:], train[:n_validation]


def iid(n: int, clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    import numpy as np

    return [np.sort(part) for part in np.array_split(rng.permutation(n), clients)]


def dirichlet(
    labels: np.ndarray, clients: int, alpha: float, rng: np.random.Generator, min_examples: int = MIN_EXAMPLES
) -> list[np.ndarray]:
    """Per-class Dirichlet(alpha) label skew; retried until every client has ``min_examples`` examples."""
    import numpy as np

    classes = np.unique(labels)
    for _ in range(100):
        parts: list[list[int]] = [[] for _ in range(clients)]
        for c in classes:
            members = rng.permutation(np.flatnonzero(labels == c))
            proportions = rng.dirichlet(np.full(clients, alpha))
            cuts = (np.cumsum(proportions)[:-1] * len(members)).astype(int)
            for k, piece in enumerate(np.split(members, cuts)):
                parts[k].extend(piece.tolist())
        if min(len(p) for p in parts) >= min_examples:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise FedloraError(
        f"Dirichlet(alpha={alpha}) could not give each of {clients} clients at least {min_examples} examples "
        "in 100 draws: use fewer clients or a larger alpha"
    )


def by_size(
    n: int,
    clients: int,
    rng: np.random.Generator,
    proportions: list[float] | None = None,
    alpha: float = 0.5,
    min_examples: int = MIN_EXAMPLES,
) -> list[np.ndarray]:
    """IID shards of unequal sizes: ``proportions`` (normalised), or drawn from Dirichlet(alpha) over clients.

    Given proportions are honoured to the example (largest remainders); each client needs at least one.
    Drawn proportions are redrawn (up to 100 times) until every client holds ``min_examples``.
    """
    import numpy as np

    def counts_for(p: np.ndarray) -> np.ndarray:
        exact = p / p.sum() * n
        counts = np.floor(exact).astype(np.int64)
        for k in np.argsort(-(exact - counts), kind="stable")[: n - int(counts.sum())]:
            counts[k] += 1
        return counts

    if proportions is not None:
        if len(proportions) != clients:
            raise FedloraError(f"data.sizes gives {len(proportions)} sizes for {clients} clients")
        counts = counts_for(np.asarray(proportions, dtype=np.float64))
        if counts.min() < 1:
            raise FedloraError(
                f"data.sizes leaves client-{int(counts.argmin())} without an example out of {n}: use larger sizes"
            )
    else:
        for _ in range(100):
            counts = counts_for(rng.dirichlet(np.full(clients, alpha)))
            if counts.min() >= min_examples:
                break
        else:
            raise FedloraError(
                f"Dirichlet(alpha={alpha}) sizes could not give each of {clients} clients at least {min_examples} "
                "examples in 100 draws: use fewer clients, a larger alpha or explicit data.sizes"
            )
    order = rng.permutation(n)
    return [np.sort(part) for part in np.split(order, np.cumsum(counts)[:-1])]


def natural(values: np.ndarray) -> tuple[list[str], list[np.ndarray]]:
    """One client per distinct value, in sorted order of the values."""
    import numpy as np

    keys = sorted({str(v) for v in values})
    as_text = np.asarray([str(v) for v in values])
    return keys, [np.flatnonzero(as_text == key) for key in keys]


# --------------------------------------------------------------------------------------------------------
# The whole step


@dataclass
class PartitionResult:
    path: Path
    manifest: dict[str, Any]


def partition(
    spec: DataSection, clients: int, out: Path, overwrite: bool = False, task: str = TASK_CLASSIFICATION
) -> PartitionResult:
    """Read ``spec.source``, hold out a test split, split the rest across clients and write the folder."""
    import numpy as np

    out = Path(out)
    _check_request(spec, clients, out, overwrite, task)
    labelled = task != TASK_CAUSAL_LM
    frame, counted, layout = _complete_rows(spec, labelled)
    frame, labels, label_names = _numbered(frame, spec, labelled, counted)
    rng = np.random.default_rng(spec.seed)
    train_idx, test_idx = split_test(len(frame), spec.test_fraction, rng)
    train_idx, validation_idx = split_validation(train_idx, len(frame), spec.validation_fraction)
    ids, parts, keys = _split(spec, frame, labels[train_idx], len(train_idx), train_idx, clients, rng)

    def counts(idx: np.ndarray) -> list[int]:
        return np.bincount(labels[idx], minlength=len(label_names)).tolist() if label_names else []

    held_out = {"test": (TEST_SHARD, test_idx), "validation": (VALIDATION_SHARD, validation_idx)}
    manifest = _manifest(spec, task, counted, label_names, {
        name: {"file": file, "examples": len(idx), "label_counts": counts(idx)} if len(idx) else None
        for name, (file, idx) in held_out.items()}, layout)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for file, idx in held_out.values():
            if len(idx):
                frame.iloc[idx].to_parquet(tmp / file, index=False)
        for k, (client_id, part) in enumerate(zip(ids, parts)):
            rows = train_idx[part]
            frame.iloc[rows].to_parquet(tmp / shard_name(client_id), index=False)
            entry = {"id": client_id, "file": shard_name(client_id), "examples": len(rows), "label_counts": counts(rows)}
            if keys is not None:
                entry["value"] = keys[k]
            manifest["clients"].append(entry)
        write_json(tmp / PARTITION_MANIFEST, manifest)
    return PartitionResult(out, manifest)


def _check_request(spec: DataSection, clients: int, out: Path, overwrite: bool, task: str) -> None:
    if spec.source is None:
        raise FedloraError("no dataset given: pass a source (or set data.source in the recipe)")
    if clients < 1:
        raise FedloraError("the number of clients must be at least 1")
    if out.exists() and not overwrite:
        raise FedloraError(f"{out} already exists (pass --overwrite to replace it)")
    if task == TASK_CAUSAL_LM and spec.strategy == "dirichlet" and spec.by is None:
        raise FedloraError("a causal-lm dataset has no labels: strategy 'dirichlet' needs a category column (--by)")
    if spec.strategy == "natural" and spec.by is None:
        raise FedloraError("strategy 'natural' needs the column that defines the clients (--by)")


def _complete_rows(spec: DataSection, labelled: bool) -> tuple[pd.DataFrame, str | None, str | None]:
    """The source's rows with every needed column present, the column whose values are counted per client, and
    (causal-lm) the data's layout.
    Causal-lm rows keep their layout's columns (:mod:`fedlora_cli.data.formats`), checked as a site would read
    them, so that a bad conversation is refused here rather than in a client's round."""
    from fedlora_cli.data import formats

    frame = read_source(spec.source, spec.split)
    optional: list[str] = []
    if labelled:
        counted = spec.label_column
        needed = [spec.text_column, spec.label_column] + ([spec.by] if spec.strategy == "natural" and spec.by else [])
    else:
        counted = spec.by
        layout = formats.resolve(frame.columns, spec, spec.source)
        needed, optional = layout.columns(spec)
        needed = needed + [c for c in (spec.answer_column, spec.by) if c]
    for column in needed:
        if column not in frame.columns:
            raise FedloraError(f"column '{column}' not in the dataset (columns: {', '.join(map(str, frame.columns))})")
    frame = frame.assign(**{c: frame[c].fillna("") if c in frame.columns else "" for c in optional})
    frame = frame[list(dict.fromkeys(needed + optional))].dropna()
    if len(frame) == 0:
        raise FedloraError(f"{spec.source} has no complete rows in columns {', '.join(dict.fromkeys(needed))}")
    if labelled:
        return frame, counted, None
    layout.read(frame, spec, spec.source)
    return frame, counted, layout.name


def _numbered(
    frame: pd.DataFrame, spec: DataSection, labelled: bool, counted: str | None
) -> tuple[pd.DataFrame, np.ndarray, list[str]]:
    """Labels (or categories) as integers 0..K-1 in name order, the frame with its label column numbered."""
    import numpy as np

    if not labelled:
        frame = frame.reset_index(drop=True)
        values = frame[counted].astype(str).to_numpy() if counted else np.asarray([], dtype=str)
        label_names = sorted(set(values.tolist()))
        index = {name: i for i, name in enumerate(label_names)}
        labels = np.asarray([index[v] for v in values], dtype=np.int64) if counted else np.zeros(len(frame), np.int64)
        return frame, labels, label_names
    raw_labels = frame[spec.label_column].astype(str)
    if spec.labels is not None:
        unknown = [v for v in spec.labels if v not in set(raw_labels)]
        if unknown:
            raise FedloraError(f"label value(s) {', '.join(unknown)} not found in column '{spec.label_column}'")
        label_names = list(spec.labels)
        keep = raw_labels.isin(label_names).to_numpy()
        frame, raw_labels = frame[keep], raw_labels[keep]
    else:
        label_names = sorted(set(raw_labels))
    if len(label_names) < 2:
        raise FedloraError(f"column '{spec.label_column}' must hold at least two label values")
    index = {name: i for i, name in enumerate(label_names)}
    frame = frame.reset_index(drop=True)
    frame[spec.label_column] = np.asarray([index[v] for v in raw_labels], dtype=np.int64)
    return frame, frame[spec.label_column].to_numpy(), label_names


def _split(
    spec: DataSection, frame: pd.DataFrame, train_labels: np.ndarray, n: int, train_idx: np.ndarray, clients: int,
    rng: np.random.Generator,
) -> tuple[list[str], list[np.ndarray], list[str] | None]:
    """Client ids, each client's positions among the training rows, and (natural) each client's column value."""
    keys = None
    if spec.strategy == "iid":
        ids, parts = client_ids(clients), iid(n, clients, rng)
    elif spec.strategy == "dirichlet":
        ids, parts = client_ids(clients), dirichlet(train_labels, clients, spec.alpha, rng)
    elif spec.strategy == "size":
        ids, parts = client_ids(clients), by_size(n, clients, rng, spec.sizes, spec.alpha)
    else:
        keys, parts = natural(frame[spec.by].to_numpy()[train_idx])
        ids = client_ids(len(keys))
    if min(len(p) for p in parts) == 0:
        raise FedloraError(f"{n} training examples cannot give each of {len(parts)} clients one")
    return ids, parts, keys


def _manifest(
    spec: DataSection, task: str, counted: str | None, label_names: list[str], held_out: dict[str, Any],
    layout: str | None = None,
) -> dict[str, Any]:
    """The partition manifest before its clients; ``held_out``: the test and validation entries (None: none)."""
    labelled = task != TASK_CAUSAL_LM
    columns = (
        {"text_column": spec.text_column} if labelled
        else {"format": layout, "prompt_column": spec.prompt_column, "response_column": spec.response_column,
              "messages_column": spec.messages_column, "answer_column": spec.answer_column}
    )
    drawn = spec.strategy == "dirichlet" or (spec.strategy == "size" and spec.sizes is None)
    return {
        "format_version": 1,
        "task": task,
        "source": spec.source,
        "split": spec.split,
        **columns,
        "label_column": counted,
        "label_names": label_names,
        "strategy": spec.strategy,
        "alpha": spec.alpha if drawn else None,
        "by": spec.by if spec.strategy == "natural" or (not labelled and spec.by) else None,
        "sizes": spec.sizes if spec.strategy == "size" else None,
        "seed": spec.seed,
        "test_fraction": spec.test_fraction,
        "validation_fraction": spec.validation_fraction,
        **held_out,
        "clients": [],
    }


def held_out(manifest: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The held-out splits a partition manifest records (test; validation when it has one), by name."""
    return [(name, manifest[name]) for name in HELD_OUT if manifest.get(name)]


def read_manifest(path: Path) -> dict[str, Any]:
    return read_json(Path(path) / PARTITION_MANIFEST, "partition manifest")


def recorded_format(folder: Path) -> str | None:
    """The causal-lm layout the partition in ``folder`` recorded for its rows (what ``data.format`` auto resolved
    to there); None for a folder holding no readable partition manifest, or one of labelled texts."""
    if not (Path(folder) / PARTITION_MANIFEST).is_file():
        return None
    try:
        layout = read_manifest(folder).get("format")
    except FedloraError:
        return None
    return layout if isinstance(layout, str) else None
