"""Masked pooling for a sequence classifier: the head reads the mean, the maximum or the first token of the last
hidden states, as a sentence-embedding checkpoint was trained to be read.

Sentence-embedding checkpoints (all-MiniLM, e5, gte and most other sentence-transformers bases) are trained to be
read through a pooling of their token states (mostly the mean); their BERT pooler (a dense layer and tanh over the
first token) was never trained for it. ``model.pooling: mean`` (``max``, ``cls``) swaps that pooler for the pooling
over the real tokens, so the task head starts from the representation the checkpoint was trained to give. The
architecture's own classifier (and its dropout) then reads it unchanged. ``model.pooling: auto`` finds the mode in
the model's own files (:mod:`fedlora_cli.model.pooling_choice`).

This file imports only torch and is self-contained on purpose: ``fedlora export --merge`` copies it next to the
merged weights as the model's custom code (``trust_remote_code=True``), so the exported model runs exactly the
pooling fedlora trained and evaluated with.
"""

from __future__ import annotations

import threading
from typing import Any

import torch


# The modes a pooler can read, as sentence-transformers names them: the mean or the element-wise maximum over the
# real tokens, or the first token's state (CLS) without the architecture's dense layer and tanh.
MODES = ("mean", "max", "cls")


class MaskedPooler(torch.nn.Module):
    """The mean (``max``: the element-wise maximum) of the hidden states over the tokens the attention mask keeps
    (all of them without a mask), or (``cls``) the first token's state.

    The mask reaches it from the encoder's own call: a forward pre-hook that ``install`` registers hands it over
    per thread, and the pooler takes it when it runs, so no call can read another's mask (or a stale one).
    """

    def __init__(self, mode: str = "mean") -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"pooling mode '{mode}' is not one of {', '.join(MODES)}")
        self.mode = mode
        self.masks: dict[int, torch.Tensor] = {}

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        mask = self.masks.pop(threading.get_ident(), None)
        if self.mode == "cls":
            return hidden_states[:, 0]
        # Reduced in float32 whatever the base's precision, then rounded once to it.
        states = hidden_states.float()
        if mask is not None and tuple(mask.shape) != tuple(states.shape[:2]):
            raise ValueError(f"attention mask of shape {tuple(mask.shape)} for hidden states {tuple(states.shape)}")
        keep = torch.ones(states.shape[:2], dtype=torch.bool, device=states.device) if mask is None else mask.bool()
        keep = keep[:, :, None]
        if self.mode == "max":
            # A row without a kept token (all padding) reads zeros rather than -inf.
            pooled = states.masked_fill(~keep, float("-inf")).amax(dim=1)
            return torch.where(keep.any(dim=1), pooled, torch.zeros_like(pooled)).to(hidden_states.dtype)
        weights = keep.to(states.dtype)
        return ((states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)).to(hidden_states.dtype)


MaskedMeanPooler = MaskedPooler  # the name exports written before max and cls pooling import


def _hand_over_mask(encoder: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    # BertModel.forward(input_ids, attention_mask, ...): by keyword from every HF head, positionally otherwise.
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    if mask is not None and mask.dim() != 2:
        raise ValueError(f"masked pooling reads a (batch, tokens) attention mask; got one of shape {tuple(mask.shape)}")
    masks = encoder.pooler.masks  # this encoder's own pooler, also in a deep copy of the model
    if mask is None:
        masks.pop(threading.get_ident(), None)
    else:
        masks[threading.get_ident()] = mask


def install(model: torch.nn.Module, mode: str = "mean") -> None:
    """Replace the pooler of a Hugging Face sequence classifier's encoder by ``MaskedPooler(mode)``.

    Only a BERT-style pooler (a dense layer and an activation over the first token's state, fed the whole
    sequence) is replaced; ValueError for an encoder without one (its head reads the first token itself, or its
    pooler is fed that token alone, as ALBERT's).
    """
    encoder = getattr(model, "base_model", model)
    pooler = getattr(encoder, "pooler", None)
    if pooler is None or not (hasattr(pooler, "dense") and hasattr(pooler, "activation")):
        raise ValueError(
            f"{type(model).__name__} has no BERT-style pooler to replace ({mode} pooling supports BERT-family encoders)"
        )
    encoder.pooler = MaskedPooler(mode)
    encoder.register_forward_pre_hook(_hand_over_mask, with_kwargs=True)


# The custom-code file an export carries: this module, and a subclass of the architecture that installs it.
REMOTE_CODE_MODULE = "fedlora_pooling"
REMOTE_CODE_FILE = f"{REMOTE_CODE_MODULE}.py"

_SUBCLASS = '''

from transformers import {architecture} as _Architecture  # noqa: E402


class {name}(_Architecture):
    """{architecture} reading the masked {mode} pooling of the last hidden states (written by fedlora export)."""

    def __init__(self, config):
        super().__init__(config)
        install(self, "{mode}")
'''


def remote_code(architecture: str, mode: str = "mean") -> tuple[str, dict[str, str]]:
    """The text of ``REMOTE_CODE_FILE`` for a model of class ``architecture`` read through ``mode``, and the
    ``config.auto_map`` through which ``AutoModelForSequenceClassification`` loads the class it defines with
    ``trust_remote_code=True``. The class is named for its mode (``MeanPooled...``, ``MaxPooled...``,
    ``ClsPooled...``), which is how ``model.pooling: auto`` reads an export back
    (:func:`fedlora_cli.model.pooling_choice.exported_mode`)."""
    from pathlib import Path

    if mode not in MODES:
        raise ValueError(f"pooling mode '{mode}' is not one of {', '.join(MODES)}")
    name = f"{mode.capitalize()}Pooled{architecture}"
    text = Path(__file__).read_text() + _SUBCLASS.format(architecture=architecture, name=name, mode=mode)
    return text, {"AutoModelForSequenceClassification": f"{REMOTE_CODE_MODULE}.{name}"}
