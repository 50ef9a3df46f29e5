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

from typing import Any

import torch


class MaskedMeanPooler(torch.nn.Module):
    """The mean of the hidden states over the tokens the attention mask keeps (all of them without a mask).

    The mask reaches it from the encoder's own call (a forward pre-hook that ``install`` registers), because a
    BERT encoder hands its pooler the hidden states alone.
    """

    def __init__(self) -> None:
        super().__init__()
        self.mask: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # Summed in float32 whatever the base's precision (a bfloat16 sum of 64 states loses the low bits).
        states = hidden_states.float()
        if self.mask is None:
            return states.mean(dim=1).to(hidden_states.dtype)
        keep = self.mask[:, : states.shape[1], None].to(states.dtype)
        return ((states * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1.0)).to(hidden_states.dtype)


def _remember_mask(pooler: MaskedMeanPooler) -> Any:
    def hook(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        # BertModel.forward(input_ids, attention_mask, ...): by keyword from every HF head, positionally otherwise.
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        if mask is not None and mask.dim() != 2:
            raise ValueError(f"mean pooling reads a (batch, tokens) attention mask; got one of shape {tuple(mask.shape)}")
        pooler.mask = mask

    return hook


def install(model: torch.nn.Module) -> None:
    """Replace the pooler of a Hugging Face sequence classifier's encoder by ``MaskedMeanPooler``.

    Raises ValueError for an architecture whose encoder has no pooler (its head reads the first token itself).
    """
    encoder = getattr(model, "base_model", model)
    if getattr(encoder, "pooler", None) is None:
        raise ValueError(
            f"{type(model).__name__} has no pooler to replace (mean pooling supports BERT-family encoders)"
        )
    pooler = MaskedMeanPooler()
    encoder.pooler = pooler
    encoder.register_forward_pre_hook(_remember_mask(pooler), with_kwargs=True)


# The custom-code file an export carries: this module, and a subclass of the architecture that installs it.
REMOTE_CODE_FILE = "fedlora_pooling.py"

_SUBCLASS = '''

from transformers import {architecture} as _Architecture  # noqa: E402


class {name}(_Architecture):
    """{architecture} reading the masked mean of the last hidden states (written by fedlora export)."""

    def __init__(self, config):
        super().__init__(config)
        install(self)
'''


def remote_code(architecture: str) -> tuple[str, str]:
    """The text of ``REMOTE_CODE_FILE`` for a model of class ``architecture``, and the class it defines, which
    ``AutoModelForSequenceClassification`` loads with ``trust_remote_code=True`` (through ``config.auto_map``)."""
    from pathlib import Path

    name = f"MeanPooled{architecture}"
    return Path(__file__).read_text() + _SUBCLASS.format(architecture=architecture, name=name), name
