"""fedlora_cli.cli.data: the partition command, labelled and unlabelled, and its mistakes."""

from __future__ import annotations

import json

from cli.helpers import fails, ok, refused


def test_partition_missing_column(tmp_path, reviews_csv):
    out = tmp_path / "p"
    fails(["partition", reviews_csv, "--label-column", "stars", "--out", out], "column 'stars'")
    assert not out.exists()


def test_partition_plot_into_a_file_path_writes_nothing(tmp_path, reviews_csv):
    (tmp_path / "a-file").write_text("")
    out = tmp_path / "p"
    fails(["partition", reviews_csv, "--label-column", "sentiment", "--out", out, "--plot", tmp_path / "a-file" / "x.png"],
          "cannot write the plot")
    assert not out.exists()


def test_partition_missing_file(tmp_path):
    out = tmp_path / "p"
    fails(["partition", tmp_path / "none.csv", "--out", out], "not found")
    assert not out.exists()


def test_partition_cli_for_unlabelled_data(tmp_path, math_jsonl):
    out = json.loads(ok(["partition", math_jsonl, "--task", "causal-lm", "--prompt-column", "question",
                         "--strategy", "size", "--sizes", "0.5,0.3,0.2", "--validation-fraction", "0",
                         "--out", tmp_path / "p", "--json"]))
    assert [c["examples"] for c in out["clients"]] == [60, 36, 24] and out["validation"] is None
    table = ok(["partition", math_jsonl, "--task", "causal-lm", "--prompt-column", "question",
                "--strategy", "dirichlet", "--by", "category", "-n", "2", "--out", tmp_path / "d"])
    assert "mul" in table and "validation" in table and "test" in table
    refused(["partition", math_jsonl, "--task", "causal-lm", "--prompt-column", "question", "--validation-fraction",
             "0.9", "--out", tmp_path / "z"], "data.validation_fraction")
    refused(["partition", math_jsonl, "--task", "causal-lm", "--prompt-column", "question", "--strategy", "dirichlet",
           "--out", tmp_path / "x"], "data.by")
    refused(["partition", math_jsonl, "--task", "causal-lm", "--out", tmp_path / "y"], "match no causal-lm data format (messages: messages; prompt-response: prompt, response")


def test_the_partition_table_falls_back_to_a_summary_when_a_column_per_label_is_too_wide(tmp_path):
    import pandas as pd

    labels = [f"a-rather-long-label-{k}" for k in range(6)]  # six columns of 22 characters: wider than 80
    pd.DataFrame({"text": [f"text {i}" for i in range(120)], "label": [labels[i % 6] for i in range(120)]}).to_csv(
        tmp_path / "many.csv", index=False)
    wide = ok(["partition", tmp_path / "many.csv", "-n", "2", "--out", tmp_path / "p"])
    assert "label values" in wide and labels[0] not in wide
    assert max(len(line) for line in wide.splitlines() if line[0] in "┏┃┡│└") <= 80  # the title may be longer
    few = ok(["partition", tmp_path / "many.csv", "-n", "2", "--labels", ",".join(labels[:2]), "--out", tmp_path / "q"])
    assert labels[0] in few and labels[1] in few  # two of them fit: a column each
