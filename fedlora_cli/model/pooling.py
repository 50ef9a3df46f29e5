"""Masked mean pooling for a sequence classifier: the head reads the mean of the last hidden states.

Sentence-embedding checkpoints (all-MiniLM, e5, gte and most other sentence-transformers bases) are trained to be
read through the mean of their token states; their BERT pooler (a dense layer and tanh over the first token) was
never trained for it. ``model.pooling: mean`` swaps that pooler for the mean over the real tokens, so the task
head starts from the representation the checkpoint was trained to give. The architecture's own classifier (and
its dropout) then reads it unchanged.

This file imports only torch and is self-contained on purpose: ``fedlora export --merge`` copies it next to the
merged weights as the model's custom code (``trust_remote_code=True``), so the exported model runs exactly the
pooling fedlora trained and evaluated with.
"""

from __future__ import annotations

import threading
from typing import Any

import torch


class MaskedMeanPooler(torch.nn.Module):
    """The mean of the hidden states over the tokens the attention mask keeps (all of them without a mask).

    The mask reaches it from the encoder's own call: a forward pre-hook that ``install`` registers hands it over
    per thread, and the pooler takes it when it runs, so no call can read another's mask (or a stale one).
    """

    def __init__(self) -> None:
        super().__init__()
        self.masks: dict[int, torch.Tensor] = {}

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        mask = self.masks.pop(threading.get_ident(), None)
        # Summed in float32 whatever the base's precision, then rounded once to it.
        states = hidden_states.float()
        if mask is None:
            return states.mean(dim=1).to(hidden_states.dtype)
        if tuple(mask.shape) != tuple(states.shape[:2]):
            raise ValueError(f"attention mask of shape {tuple(mask.shape)} for hidden states {tuple(states.shape)}")
        keep = mask[:, :, None].to(states.dtype)
        return ((states * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1.0)).to(hidden_states.dtype)


def _hand_over_mask(encoder: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    # BertModel.forward(input_ids, attention_mask, ...): by keyword from every HF head, positionally otherwise.
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    if mask is not None and mask.dim() != 2:
        raise ValueError(f"mean pooling reads a (batch, tokens) attention mask; got one of shape {tuple(mask.shape)}")
    masks = encoder.pooler.masks  # this encoder's own pooler, also in a deep copy of the model
    if mask is None:
        masks.pop(threading.get_ident(), None)
    else:
        masks[threading.get_ident()] = mask


def install(model: torch.nn.Module) -> None:
    """Replace the pooler of a Hugging Face sequence classifier's encoder by ``MaskedMeanPooler``.

    Only a BERT-style pooler (a dense layer and an activation over the first token's state, fed the whole
    sequence) is replaced; ValueError for an encoder without one (its head reads the first token itself, or its
    pooler is fed that token alone, as ALBERT's).
    """
    encoder = getattr(model, "base_model", model)
    pooler = getattr(encoder, "pooler", None)
    if pooler is None or not (hasattr(pooler, "dense") and hasattr(pooler, "activation")):
        raise ValueError(
            f"{type(model).__name__} has no BERT-style pooler to replace (mean pooling supports BERT-family encoders)"
        )
    encoder.pooler = MaskedMeanPooler()
    encoder.register_forward_pre_hook(_hand_over_mask, with_kwargs=True)


# The custom-code file an export carries: this module, and a subclass of the architecture that installs it.
REMOTE_CODE_MODULE = "fedlora_pooling"
REMOTE_CODE_FILE = f"{REMOTE_CODE_MODULE}.py"

_SUBCLASS = '''

from transformers import {architecture} as _Architecture  # noqa: E402


class {name}(_Architecture):
    """{architecture} reading the masked mean of the last hidden states (written by fedlora export)."""

    def __init__(self, config):
        super().__init__(config)
        install(self)
'''


def remote_code(architecture: str) -> tuple[str, dict[str, str]]:
    """The text of ``REMOTE_CODE_FILE`` for a model of class ``architecture``, and the ``config.auto_map`` through
    which ``AutoModelForSequenceClassification`` loads the class it defines with ``trust_remote_code=True``."""
    from pathlib import Path

    name = f"MeanPooled{architecture}"
    text = Path(__file__).read_text() + _SUBCLASS.format(architecture=architecture, name=name)
    return text, {"AutoModelForSequenceClassification": f"{REMOTE_CODE_MODULE}.{name}"}


def is_export(config: Any) -> bool:
    """Whether a model config is a mean-pooled export's (its ``auto_map`` names this module's code)."""
    auto_map = getattr(config, "auto_map", None) or {}
    return any(str(v).startswith(f"{REMOTE_CODE_MODULE}.") for v in auto_map.values())
