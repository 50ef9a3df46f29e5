"""What the export tests share: the export command (one line on failure), and loading an export as a user without
fedlora would (plain PEFT and transformers)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
import yaml
from conftest import make_reviews
from safetensors.torch import load_file
from typer.testing import CliRunner

from fedlora_cli import federation
from fedlora_cli.cli import app

runner = CliRunner()


TEXTS = make_reviews(12, seed=99)["text"].tolist()


LAST = 2  # conftest's recipes run 2 rounds


def ok(args: list) -> str:
    result = runner.invoke(app, ["export", *[str(a) for a in args]])
    assert result.exit_code == 0, result.output
    return result.stdout


def fails(args: list, *needles: str) -> str:
    result = runner.invoke(app, ["export", *[str(a) for a in args]])
    output = result.output
    assert result.exit_code == 1, output
    assert "Traceback" not in output
    error_lines = [line for line in output.splitlines() if "error:" in line]
    assert len(error_lines) == 1, output
    text = " ".join(output.split())
    for needle in needles:
        assert needle in text, f"{needle!r} not in {text!r}"
    return text


def no_leftovers(parent: Path, name: str) -> None:
    assert not [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")], "temporary folder left behind"


def logits(model, tokenizer) -> torch.Tensor:
    model.eval()
    batch = tokenizer(TEXTS, padding=True, truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits.float()


def fedlora_logits(global_dir: Path, state: Path | None = None) -> torch.Tensor:
    bench, _ = federation.load_for_evaluation(global_dir, state)
    return logits(bench.model, bench.tokenizer)


def load_adapter_plainly(folder: Path, num_labels: int = 2):
    """What a user without fedlora does: base from adapter_config's path, then PeftModel.from_pretrained."""
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    config = json.loads((folder / "adapter_config.json").read_text())
    base = AutoModelForSequenceClassification.from_pretrained(config["base_model_name_or_path"], num_labels=num_labels)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, folder)
    assert not [w for w in caught if "missing" in str(w.message).lower()], [str(w.message) for w in caught]
    saved = load_file(str(folder / "adapter_model.safetensors"))
    loaded = get_peft_model_state_dict(model)
    assert set(saved) == set(loaded), "missing or unexpected adapter keys"
    assert any("classifier" in name for name in saved), "the classifier head is not in the adapter"
    for name, t in saved.items():
        assert torch.equal(loaded[name].to(t.dtype), t), name
    return model, AutoTokenizer.from_pretrained(folder)


def load_merged_plainly(folder: Path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    assert not (folder / "adapter_config.json").exists()
    model, info = AutoModelForSequenceClassification.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not [name for name, _ in model.named_parameters() if "lora_" in name or "modules_to_save" in name]
    return model, AutoTokenizer.from_pretrained(folder)


def card_of(folder: Path) -> tuple[dict, str, dict[str, str]]:
    """Front matter, body, and the training table as {field: value}."""
    text = (folder / "README.md").read_text()
    assert text.startswith("---\n")
    front, body = text[4:].split("\n---\n", 1)
    table = {}
    for line in body.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 2:
            table[cells[0]] = cells[1]
    return yaml.safe_load(front), body, table
