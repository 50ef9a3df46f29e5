"""fedlora_cli.data.sources: reading a dataset from a file (compressed or not) or a folder, and refusing an empty,
truncated, unreadable or missing one in one line."""

from __future__ import annotations

import gzip

import pandas as pd
import pytest

from fedlora_cli.data.sources import read_source
from fedlora_cli.errors import FedloraError


@pytest.mark.parametrize("name", ["r.csv", "r.csv.gz", "r.csv.bz2", "r.tsv", "r.jsonl", "r.json", "r.parquet"])
def test_every_file_kind_reads_the_same_rows(tmp_path, name):
    frame = pd.DataFrame({"text": ["good film", "dull plot"], "sentiment": ["pos", "neg"]})
    path = tmp_path / name
    if ".csv" in name:
        frame.to_csv(path, index=False)  # pandas compresses by the suffix
    elif name.endswith(".tsv"):
        frame.to_csv(path, sep="\t", index=False)
    elif name.endswith(".parquet"):
        frame.to_parquet(path)
    else:
        frame.to_json(path, orient="records", lines=name.endswith(".jsonl"))
    pd.testing.assert_frame_equal(read_source(str(path)), frame)


def test_bad_files_are_refused_by_name(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    with pytest.raises(FedloraError, match=r"empty\.csv is empty"):
        read_source(str(empty))
    truncated = tmp_path / "cut.csv.gz"
    truncated.write_bytes(gzip.compress(b"text,sentiment\n" + b"good film,pos\n" * 200)[:40])
    with pytest.raises(FedloraError, match=r"cannot read .*cut\.csv\.gz"):
        read_source(str(truncated))
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"not parquet at all")
    with pytest.raises(FedloraError, match=r"cannot read .*garbage\.parquet"):
        read_source(str(garbage))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(FedloraError, match="unsupported file type"):
        read_source(str(tmp_path / "notes.txt"))
    # A missing file is named as missing, not looked up on the Hub, compressed or not.
    for name in ("gone.csv", "gone.csv.gz", "data/gone.jsonl.bz2"):
        with pytest.raises(FedloraError, match=f"dataset not found: {name}"):
            read_source(name)
