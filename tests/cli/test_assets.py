"""fedlora_cli.cli.assets: datasets gsm-symbolic and convert-gguf."""

from __future__ import annotations

import json

import pytest

from cli.helpers import ok, refused
from fedlora_cli.model import evaluation


def test_datasets_gsm_symbolic_writes_deterministic_jsonl(tmp_path):
    pytest.importorskip("reasoning_gym")
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    ok(["datasets", "gsm-symbolic", "--size", "5", "--seed", "3", "-o", a])
    ok(["datasets", "gsm-symbolic", "--size", "5", "--seed", "3", "-o", b])
    assert a.read_text() == b.read_text()
    rows = [json.loads(line) for line in a.read_text().splitlines()]
    assert len(rows) == 5 and {"question", "response", "answer", "template", "id"} <= set(rows[0])
    for row in rows:
        assert evaluation.extract_number(row["response"]) == evaluation.canonical_number(row["answer"])
    refused(["datasets", "gsm-symbolic", "--size", "5", "-o", a], "already exists")
    refused(["datasets", "gsm-symbolic", "--size", "5", "-o", tmp_path / "c.csv"], "*.jsonl")
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_convert_gguf_refuses_bad_sources_in_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    refused(["convert-gguf", tmp_path / "missing.gguf", "-o", tmp_path / "out"], "GGUF file not found")
    refused(["convert-gguf", tmp_path / "empty", "-o", tmp_path / "out"], "expected one .gguf file")
    (tmp_path / "model.bin").write_bytes(b"x")
    refused(["convert-gguf", tmp_path / "model.bin", "-o", tmp_path / "out"], "is not a .gguf file")
    assert not (tmp_path / "out").exists()
