"""Split a labelled dataset across clients, with a held-out test split for evaluation.

Strategies:

- ``iid``: a seeded shuffle dealt out in near-equal shards.
- ``dirichlet``: label skew. For every class, client proportions are drawn from Dirichlet(alpha) and that
  class's examples are split accordingly (Hsu et al. 2019; the convention of FedSA-LoRA's Dir(0.5) split).
  Draws are repeated (up to 100 times) until every client holds at least ``min_examples`` examples.
- ``natural``: one client per distinct value of a column (a site, a user, a category).

These are written here rather than taken from flwr-datasets: its partitioners are what we would use, but its
0.6.1 release pins datasets<5 and rich<15, while fedlora needs datasets 5 and rich 15. The strategies are
small, seeded with numpy's PCG64 and tested directly.

Output folder::

    partition.json      strategy, seed, source, columns, label names, per-client and test label counts
    client-0.parquet    one shard per client (text column and integer label column)
    ...
    test.parquet        the held-out test split, shared by every evaluation
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedlora_cli.checkpoint import atomic_dir, read_json, write_json
from fedlora_cli.errors import FedloraError
from fedlora_cli.recipe import DataSection, resolve_location

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

PARTITION_MANIFEST = "partition.json"
TEST_SHARD = "test.parquet"
MIN_EXAMPLES = 10


def shard_name(client_id: str) -> str:
    return f"{client_id}.parquet"


def client_ids(n: int) -> list[str]:
    return [f"client-{i}" for i in range(n)]


# --------------------------------------------------------------------------------------------------------
# Reading a source


def read_source(source: str, split: str = "train") -> pd.DataFrame:
    """A Hub dataset name, a CSV/TSV/JSON/JSONL/Parquet file (optionally .gz/.bz2/.xz), or a save_to_disk folder."""
    import pandas as pd

    location = resolve_location(source)
    path = Path(location)
    if path.is_dir():
        return _read_saved(path, split)
    if path.is_file():
        suffixes = [s.lower() for s in path.suffixes]
        if suffixes and suffixes[-1] in (".gz", ".bz2", ".xz", ".zst"):
            suffixes = suffixes[:-1]
        kind = suffixes[-1] if suffixes else ""
        try:
            if kind in (".csv", ".tsv"):
                return pd.read_csv(path, sep="\t" if kind == ".tsv" else ",")
            if kind == ".jsonl":
                return pd.read_json(path, lines=True)
            if kind == ".json":
                try:
                    return pd.read_json(path)
                except ValueError:
                    return pd.read_json(path, lines=True)
            if kind == ".parquet":
                return pd.read_parquet(path)
        except (ValueError, OSError, pd.errors.ParserError) as exc:
            raise FedloraError(f"cannot read {path}: {str(exc).splitlines()[0]}") from None
        raise FedloraError(f"{path}: unsupported file type (use .csv, .tsv, .json, .jsonl or .parquet)")
    if source.startswith((".", "/", "~")) or source.endswith((".csv", ".json", ".jsonl", ".parquet", ".tsv")):
        raise FedloraError(f"dataset not found: {source}")
    return _read_hub(source, split)


def _read_saved(path: Path, split: str) -> pd.DataFrame:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as exc:
        raise FedloraError(f"{path} is not a datasets save_to_disk folder ({str(exc).splitlines()[0]})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise FedloraError(f"{path} has no split '{split}' (has: {', '.join(loaded)})")
        loaded = loaded[split]
    return loaded.to_pandas()


def _read_hub(name: str, split: str) -> pd.DataFrame:
    import datasets

    try:
        return datasets.load_dataset(name, split=split).to_pandas()
    except Exception as exc:  # the Hub client raises many types (offline, auth, missing); all mean one thing here
        raise FedloraError(f"cannot load dataset '{name}' from the Hugging Face Hub: {str(exc).splitlines()[0]}") from None


# --------------------------------------------------------------------------------------------------------
# Strategies: pure functions from labels to index lists


def split_test(n: int, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random hold-out: (train indices, test indices)."""
    order = rng.permutation(n)
    n_test = max(1, int(round(n * fraction)))
    return order[n_test:], order[:n_test]


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


def partition(spec: DataSection, clients: int, out: Path, overwrite: bool = False) -> PartitionResult:
    """Read ``spec.source``, hold out a test split, split the rest across clients and write the folder."""
    import numpy as np

    if spec.source is None:
        raise FedloraError("no dataset given: pass a source (or set data.source in the recipe)")
    if clients < 1:
        raise FedloraError("the number of clients must be at least 1")
    out = Path(out)
    if out.exists() and not overwrite:
        raise FedloraError(f"{out} already exists (pass --overwrite to replace it)")
    frame = read_source(spec.source, spec.split)
    needed = [spec.text_column, spec.label_column] + ([spec.by] if spec.strategy == "natural" and spec.by else [])
    for column in needed:
        if column not in frame.columns:
            raise FedloraError(f"column '{column}' not in the dataset (columns: {', '.join(map(str, frame.columns))})")
    frame = frame[list(dict.fromkeys(needed))].dropna()
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
    labels = frame[spec.label_column].to_numpy()

    rng = np.random.default_rng(spec.seed)
    train_idx, test_idx = split_test(len(frame), spec.test_fraction, rng)
    train_labels = labels[train_idx]
    if spec.strategy == "iid":
        ids, parts = client_ids(clients), iid(len(train_idx), clients, rng)
    elif spec.strategy == "dirichlet":
        ids, parts = client_ids(clients), dirichlet(train_labels, clients, spec.alpha, rng)
    else:
        keys, parts = natural(frame[spec.by].to_numpy()[train_idx])
        ids = client_ids(len(keys))
    if min(len(p) for p in parts) == 0:
        raise FedloraError(f"{len(train_idx)} training examples cannot give each of {len(parts)} clients one")

    def counts(idx: np.ndarray) -> list[int]:
        return np.bincount(labels[idx], minlength=len(label_names)).tolist()

    manifest: dict[str, Any] = {
        "format_version": 1,
        "source": spec.source,
        "split": spec.split,
        "text_column": spec.text_column,
        "label_column": spec.label_column,
        "label_names": label_names,
        "strategy": spec.strategy,
        "alpha": spec.alpha if spec.strategy == "dirichlet" else None,
        "by": spec.by if spec.strategy == "natural" else None,
        "seed": spec.seed,
        "test_fraction": spec.test_fraction,
        "test": {"file": TEST_SHARD, "examples": len(test_idx), "label_counts": counts(test_idx)},
        "clients": [],
    }
    with atomic_dir(out, overwrite=overwrite) as tmp:
        frame.iloc[test_idx].to_parquet(tmp / TEST_SHARD, index=False)
        for k, (client_id, part) in enumerate(zip(ids, parts)):
            rows = train_idx[part]
            frame.iloc[rows].to_parquet(tmp / shard_name(client_id), index=False)
            entry = {"id": client_id, "file": shard_name(client_id), "examples": len(rows), "label_counts": counts(rows)}
            if spec.strategy == "natural":
                entry["value"] = keys[k]
            manifest["clients"].append(entry)
        write_json(tmp / PARTITION_MANIFEST, manifest)
    return PartitionResult(out, manifest)


def read_manifest(path: Path) -> dict[str, Any]:
    return read_json(Path(path) / PARTITION_MANIFEST, "partition manifest")


def plot(manifest: dict[str, Any], png: Path) -> None:
    """Stacked bars: examples per label for every client, and the test split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = [c["id"] for c in manifest["clients"]] + ["test"]
    counts = np.asarray([c["label_counts"] for c in manifest["clients"]] + [manifest["test"]["label_counts"]])
    fig, ax = plt.subplots(figsize=(max(4.0, 0.8 * len(names) + 2), 3.6))
    bottom = np.zeros(len(names))
    for j, label in enumerate(manifest["label_names"]):
        ax.bar(names, counts[:, j], bottom=bottom, label=str(label))
        bottom += counts[:, j]
    title = manifest["strategy"] + (f" (alpha={manifest['alpha']})" if manifest.get("alpha") else "")
    ax.set_title(f"Label distribution per client: {title}, seed {manifest['seed']}")
    ax.set_ylabel("examples")
    ax.legend(title=manifest["label_column"], fontsize="small")
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    fig.tight_layout()
    tmp = png.with_name(f".{png.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(png)
