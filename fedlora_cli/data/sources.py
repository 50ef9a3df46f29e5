"""Reading a dataset from wherever a site keeps it, into one pandas frame.

A source is a Hugging Face Hub dataset name (with a split), a CSV/TSV/JSON/JSONL/Parquet file (optionally
compressed: .gz, .bz2, .xz, .zst), a ``datasets`` ``save_to_disk`` folder, or a ``pkg:`` path into an installed
package. ``fedlora partition`` reads the dataset it splits this way.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from fedlora_cli.errors import FedloraError, first_line
from fedlora_cli.recipe.loading import resolve_location

if TYPE_CHECKING:
    import pandas as pd


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
            raise FedloraError(f"cannot read {path}: {first_line(exc)}") from None
        raise FedloraError(f"{path}: unsupported file type (use .csv, .tsv, .json, .jsonl or .parquet)")
    if source.startswith((".", "/", "~")) or source.endswith((".csv", ".json", ".jsonl", ".parquet", ".tsv")):
        raise FedloraError(f"dataset not found: {source}")
    return _read_hub(source, split)


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
