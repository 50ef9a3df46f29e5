"""Reading a dataset from wherever a site keeps it, into one pandas frame.

A source is a Hugging Face Hub dataset name (with a split), a CSV/TSV/JSON/JSONL/Parquet file (optionally
compressed: .gz, .bz2, .xz, .zst), a ``datasets`` ``save_to_disk`` folder, or a ``pkg:`` path into an installed
package. ``fedlora partition`` reads the dataset it splits this way, and ``train-client`` and ``evaluate`` a
site's own data (:mod:`fedlora_cli.data.examples`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from fedlora_cli.errors import FedloraError, first_line
from fedlora_cli.recipe.loading import resolve_location

if TYPE_CHECKING:
    import pandas as pd


FILE_KINDS = (".csv", ".tsv", ".json", ".jsonl", ".parquet")
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")


def _file_kind(path: Path) -> str:
    """A data file's kind, its compression suffix set aside: ``.csv`` for ``reviews.csv.gz``; ``""`` for none."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def read_source(source: str, split: str = "train") -> pd.DataFrame:
    """A Hub dataset name, a CSV/TSV/JSON/JSONL/Parquet file (optionally .gz/.bz2/.xz), or a save_to_disk folder."""
    location = resolve_location(source)
    path = Path(location)
    if path.is_dir():
        return _read_saved(path, split)
    if path.is_file():
        return _read_file(path)
    if source.startswith((".", "/", "~")) or _file_kind(Path(source)) in FILE_KINDS:
        raise FedloraError(f"dataset not found: {source}")
    return _read_hub(source, split)


def _read_file(path: Path) -> pd.DataFrame:
    import pandas as pd

    kind = _file_kind(path)
    if kind not in FILE_KINDS:
        raise FedloraError(f"{path}: unsupported file type (use .csv, .tsv, .json, .jsonl or .parquet)")
    if path.stat().st_size == 0:
        raise FedloraError(f"{path} is empty")
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
        return pd.read_parquet(path)
    except pd.errors.EmptyDataError:
        raise FedloraError(f"{path} is empty") from None
    # EOFError: a truncated .gz or .bz2 file.
    except (ValueError, OSError, EOFError) as exc:
        raise FedloraError(f"cannot read {path}: {first_line(exc)}") from None


def _read_saved(path: Path, split: str) -> pd.DataFrame:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as exc:
        raise FedloraError(f"{path} is not a datasets save_to_disk folder ({first_line(exc)})") from None
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
        raise FedloraError(f"cannot load dataset '{name}' from the Hugging Face Hub: {first_line(exc)}") from None
