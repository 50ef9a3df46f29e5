"""The JSON manifests beside each folder's tensors, and their checked reading.

Manifests come from other sites: every field is checked against its annotation when read (a count that is a
string, a bool or NaN is refused by name), and the format version must be the one this fedlora writes.
"""

from __future__ import annotations

import math
import time
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from fedlora_cli.errors import FedloraError

FORMAT_VERSION = 1


def _from_dict(cls: type, data: dict[str, Any], path: Path, what: str) -> Any:
    if not isinstance(data, dict):
        raise FedloraError(f"{what} {path} is not a JSON object")
    names = {f.name for f in fields(cls)}
    missing = [f.name for f in fields(cls) if f.name not in data and f.default is MISSING and f.default_factory is MISSING]
    if data.get("format_version") != FORMAT_VERSION:
        raise FedloraError(
            f"{what} {path} has format version {data.get('format_version')!r}; this fedlora reads {FORMAT_VERSION}"
        )
    if missing:
        raise FedloraError(f"{what} {path} is missing field(s): {', '.join(missing)}")
    for f in fields(cls):
        if f.name in data and not _has_type(data[f.name], str(f.type)):
            raise FedloraError(f"{what} {path}: field '{f.name}' must be {f.type}; got {_shown(data[f.name])}")
        if f.name in _COUNTS and f.name in data and data[f.name] < 0:
            raise FedloraError(f"{what} {path}: field '{f.name}' must not be negative; got {data[f.name]}")
    _check_privacy(data, f"{what} {path}")
    return cls(**{k: v for k, v in data.items() if k in names})


# A privacy record as privacy.Ledger.to_dict writes it (an update's without its history): number -> may be None. The
# coordinator takes the largest epsilon of a round's updates, a client reads its ledger back from its state.
_PRIVACY_NUMBERS = {"delta": False, "epsilon": False, "budget": True, "remaining": True}


def _check_privacy(data: dict[str, Any], where: str) -> None:
    record = data.get("privacy")
    if isinstance(record, dict):
        if not isinstance(record.get("accountant"), str):
            raise FedloraError(f"{where}: privacy 'accountant' must be text; got {_shown(record.get('accountant'))}")
        for key, optional in _PRIVACY_NUMBERS.items():
            value = record.get(key)
            if not (optional and value is None) and not _amount(value):
                raise FedloraError(f"{where}: privacy '{key}' must be a non-negative number; got {_shown(value)}")
        if "history" in record:
            _check_ledger(record["history"], f"{where}: privacy 'history'")
    if "server_privacy_ledger" in data:
        _check_ledger(data["server_privacy_ledger"], f"{where}: field 'server_privacy_ledger'")


def _check_ledger(history: Any, where: str) -> None:
    """Releases as [noise multiplier, sample rate, steps]: three non-negative finite numbers, whole steps."""
    for entry in history if isinstance(history, list) else [None]:
        if not (isinstance(entry, list) and len(entry) == 3 and all(_amount(x) and x != math.inf for x in entry)
                and float(entry[2]).is_integer()):
            raise FedloraError(f"{where} must list [noise multiplier, sample rate, steps]; got {_shown(entry)}")


def _amount(value: Any) -> bool:
    """A JSON number that is not NaN, not negative and (an integer) fits in 64 bits; infinity passes."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return value >= 0 and (value < 2**63 if isinstance(value, int) else not math.isnan(value))


# The fields that count something (rounds, examples, steps, bytes): never negative.
_COUNTS = ("round", "num_examples", "shard_examples", "steps", "bytes")


def _shown(value: Any) -> str:
    """A value in a one-line message: its repr, cut short (an integer of thousands of digits by its size)."""
    if isinstance(value, int) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    return f"{value!r:.60}"


_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "dict": (dict,), "list": (list,),
    "Any": (object,),
}


def _has_type(value: Any, annotation: str) -> bool:
    """Whether a JSON value fits a manifest field's annotation (``int``, ``str | None``, ``dict[str, str]``...).

    Manifests come from other sites: a count that is a string, a bool or NaN must be refused by name, not
    crash later or poison an average.
    """
    for option in _split(annotation, "|"):
        if option == "None":
            if value is None:
                return True
            continue
        head, _, args = option.partition("[")
        kinds = _JSON_TYPES.get(head, (object,))
        if isinstance(value, bool) and bool not in kinds and object not in kinds:  # True is an int to Python
            continue
        if isinstance(value, kinds) and (not args or _items_have_type(value, _split(args[:-1], ","))):
            return True
    return False


def _items_have_type(value: list[Any] | dict[str, Any], args: list[str]) -> bool:
    """Whether a list's items (``list[X]``) or a mapping's values (``dict[str, X]``) are of their annotation."""
    items = value.values() if isinstance(value, dict) else value
    return all(_has_type(item, args[-1]) for item in items)


def _split(annotation: str, separator: str) -> list[str]:
    """``annotation`` split at ``separator`` outside brackets: ``dict[str, str] | None`` -> the two options."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(annotation):
        depth += (char == "[") - (char == "]")
        if char == separator and depth == 0:
            parts.append(annotation[start:i].strip())
            start = i + 1
    return [*parts, annotation[start:].strip()]


@dataclass
class GlobalManifest:
    """fedlora.json beside a global checkpoint's PEFT files."""

    round: int
    method: str
    head: str
    adapter_kind: str
    base_model: str
    base_fingerprint: str
    recipe: dict[str, Any]
    recipe_digest: str
    seed: int
    num_labels: int | None  # None for a causal LM
    # name -> 'xxh128:<hex>' (bare sha256 hex if written before xxh128; see fedlora_cli.storage.files)
    tensor_digests: dict[str, str]
    digest: str  # the checkpoint's identity (global_digest), which its client updates carry as parent_digest
    frozen_digest: str | None
    label_names: list[str] | None = None
    clients: list[str] = field(default_factory=list)
    # DP-FedAvg spending at the coordinator: [noise multiplier, sample rate, steps] per aggregated round.
    server_privacy_ledger: list[list[float]] = field(default_factory=list)
    # The delta that ledger's epsilon is stated at (the last DP-FedAvg round's).
    server_privacy_delta: float | None = None
    # Digests of correction.safetensors' tensors (layer -> digest): present after an 'exact' aggregation.
    correction_digests: dict[str, str] = field(default_factory=dict)
    # Digests of server_state.safetensors' tensors (a server optimiser's moments): present with one.
    server_state_digests: dict[str, str] = field(default_factory=dict)
    # The clients asked to train the round that wrote this checkpoint, when the federation samples them
    # (federation.clients_per_round); None: every client was asked. ``clients`` are those it aggregated.
    asked: list[str] | None = None
    # How the round that wrote this checkpoint aggregated: strategy, norm bound, clipped and rejected clients,
    # and for svd/exact the per-layer error plain averaging would have made (see aggregation.LayerReport).
    aggregation: dict[str, Any] | None = None
    # Where the recipe's model.pooling came from ('recipe', or for 'auto' the model file it was read from or the
    # fallback taken); None in checkpoints written before pooling was resolved.
    pooling_source: str | None = None
    created: float = field(default_factory=time.time)
    format_version: int = FORMAT_VERSION


@dataclass
class UpdateManifest:
    """update.json beside a client update's tensors."""

    client_id: str
    round: int
    parent_digest: str
    method: str
    recipe_digest: str
    base_fingerprint: str
    frozen_digest: str | None
    num_examples: int
    shard_examples: int
    steps: int
    # Mean training loss of the round; None under DP-SGD, where it would release un-noised information about the
    # client's data that no accountant covers (the client keeps it in its state).
    loss: float | None
    seconds: float
    bytes: int
    tensor_digests: dict[str, str]
    # Cumulative DP-SGD spending after this round (epsilon, delta, budget, remaining), if the recipe has privacy.
    privacy: dict[str, Any] | None = None
    # How the site loaded and ran the model (device, base precision or quantisation, micro-batches): for the
    # record only, since sites may differ in all of it (see fedlora_cli.model.site).
    site: dict[str, Any] | None = None
    # How the tensors travel (federation.update_encoding, see fedlora_cli.storage.encoding): 'float32' (as
    # they are), or the difference from what the client received in 'bfloat16' or blockwise 'int8'.
    encoding: str = "float32"
    format_version: int = FORMAT_VERSION


@dataclass
class StateManifest:
    """state.json in one round of a client's private state."""

    client_id: str
    round: int
    parent_digest: str
    recipe_digest: str
    tensor_digests: dict[str, str]
    # The client's privacy ledger (see fedlora_cli.privacy.Ledger), carried from round to round.
    privacy: dict[str, Any] | None = None
    loss: float | None = None  # this round's mean training loss, kept at home (the update omits it under DP)
    format_version: int = FORMAT_VERSION
