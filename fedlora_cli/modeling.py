"""Building the base model and its PEFT adapter from a recipe, and moving adapter tensors in and out.

Adapter tensors are named as PEFT saves them (``get_peft_model_state_dict``: no adapter name, head weights as
``...classifier.weight``), so that every file fedlora writes is a file PEFT itself reads.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedlora_cli.errors import FedloraError
from fedlora_cli.methods import Plan
from fedlora_cli.recipe import Recipe, resolve_location

if TYPE_CHECKING:
    import torch


@dataclass
class Workbench:
    """A base model wrapped with the recipe's adapter, its tokenizer, and the base model's fingerprint.

    Built once per process and reused across clients in ``simulate``: every round loads the global tensors
    and the client's own state into it, so nothing leaks from one client to the next.
    """

    recipe: Recipe
    model: Any
    tokenizer: Any
    fingerprint: str
    base_location: str

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        from peft.utils import get_peft_model_state_dict

        return {name: t.detach().clone() for name, t in get_peft_model_state_dict(self.model).items()}

    def load_adapter_tensors(self, tensors: Mapping[str, torch.Tensor], partial: bool = False) -> None:
        """Copy tensors into the adapter; names must match the adapter's (all of them unless ``partial``)."""
        from peft.utils import set_peft_model_state_dict

        expected = set(self.adapter_tensors_shapes())
        unknown = sorted(set(tensors) - expected)
        if unknown:
            raise FedloraError(f"tensor '{unknown[0]}' is not part of this adapter ({len(unknown)} unknown)")
        missing = sorted(expected - set(tensors))
        if missing and not partial:
            raise FedloraError(f"adapter tensor '{missing[0]}' is missing ({len(missing)} missing)")
        shapes = self.adapter_tensors_shapes()
        for name, t in tensors.items():
            if tuple(t.shape) != shapes[name]:
                raise FedloraError(f"tensor '{name}' has shape {tuple(t.shape)}, the adapter has {shapes[name]}")
        # PEFT expects every head tensor at once, so a partial load goes through a full adapter state.
        full = {**self.adapter_tensors(), **tensors} if partial else dict(tensors)
        result = set_peft_model_state_dict(self.model, full)
        if result.unexpected_keys:
            raise FedloraError(f"PEFT did not accept tensor '{result.unexpected_keys[0]}'")

    def adapter_tensors_shapes(self) -> dict[str, tuple[int, ...]]:
        from peft.utils import get_peft_model_state_dict

        return {name: tuple(t.shape) for name, t in get_peft_model_state_dict(self.model).items()}

    def set_trainable(self, plan: Plan) -> list[torch.nn.Parameter]:
        """Freeze everything but the roles the plan trains; returns the trainable parameters."""
        trainable = []
        for name, param in self.model.named_parameters():
            is_adapter = "lora_" in name or "modules_to_save" in name
            param.requires_grad = is_adapter and plan.trains(name)
            if param.requires_grad:
                trainable.append(param)
        return trainable

    def adapter_config(self) -> dict[str, Any]:
        config = self.model.peft_config["default"].to_dict()
        config["base_model_name_or_path"] = self.recipe.model.base
        return json.loads(json.dumps(config, default=sorted))


def _task_type(task: str) -> str:
    return {"sequence-classification": "SEQ_CLS"}[task]


def build(recipe: Recipe, num_labels: int, base_override: str | None = None) -> Workbench:
    """Load the base model and tokenizer, attach a freshly initialised adapter (seeded by ``training.seed``)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    location = resolve_location(base_override or recipe.model.base)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    torch.manual_seed(recipe.training.seed)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, revision=recipe.model.revision)
        model = AutoModelForSequenceClassification.from_pretrained(
            location, num_labels=num_labels, revision=recipe.model.revision
        )
    except (OSError, ValueError) as exc:
        raise FedloraError(f"cannot load base model '{location}': {str(exc).strip().splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    fingerprint = base_fingerprint(model)
    adapter = recipe.adapter
    config = LoraConfig(
        r=adapter.r,
        lora_alpha=adapter.alpha,
        lora_dropout=adapter.dropout,
        target_modules=list(adapter.target_modules),
        task_type=_task_type(recipe.model.task),
    )
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as exc:
        raise FedloraError(f"adapter.target_modules: {str(exc).strip().splitlines()[0]}") from None
    peft_model.eval()  # training switches to train mode for its steps and back
    return Workbench(recipe, peft_model, tokenizer, fingerprint, location)


def base_fingerprint(model: Any) -> str:
    """Identifies the base model by its architecture and weights, independent of where it was loaded from.

    Hashes the config (without paths and versions) and the first and last weight matrices: two sites with the
    same base model at different paths agree; a different model or a different fine-tune does not.
    """
    import torch

    config = model.config.to_dict()
    for key in ("_name_or_path", "transformers_version", "name_or_path", "_commit_hash"):
        config.pop(key, None)
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    weights = [p for name, p in model.named_parameters() if p.dim() == 2 and "classifier" not in name]
    for p in (weights[0], weights[-1]) if weights else ():
        h.update(p.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]
