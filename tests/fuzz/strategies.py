"""Inputs other parties write, for the properties of :mod:`.properties`: valid files with one thing changed
(a field of the wrong type, a huge number, NaN, a negative, a key missing or added, a value wrapped in another
level), safetensors files with broken headers, text that no parser should choke on, and raw bytes."""

from __future__ import annotations

import copy
import json
import math
import struct
from dataclasses import asdict
from functools import cache
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

REPO = Path(__file__).resolve().parents[2]
# Each dtype code safetensors writes, with its item size in bytes.
DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
UNKNOWN_DTYPES = ["F8_E4M3", "F8_E5M2", "U64", "C64", "Q4", "f32", "", "F32 "]

# Values no field should take: the wrong type, too large for any integer or float arithmetic, NaN, negative.
_ODD_NUMBERS = st.sampled_from([10**30, 2**63, 2**64, -1, -(2**63), 0, 10**400, -0.0, 1e308, 1e-320])
_FLOATS = st.floats(allow_nan=True, allow_infinity=True)
_LEAVES = st.one_of(st.none(), st.booleans(), st.integers(), _ODD_NUMBERS, _FLOATS, st.text(max_size=12))
JUNK = st.one_of(
    _LEAVES,
    st.lists(_LEAVES, max_size=3),
    st.dictionaries(st.text(max_size=6), _LEAVES, max_size=3),
    st.integers(20, 200).map(lambda depth: json.loads("[" * depth + "]" * depth)),
)


@cache
def valid_recipe() -> dict[str, Any]:
    """The quickstart recipe as its YAML file reads."""
    import yaml

    return yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text())


@cache
def valid_manifests() -> dict[str, dict[str, Any]]:
    """A global checkpoint's, a client update's and a client state's manifest, each as its writer writes it."""
    from fedlora_cli import recipe as recipes
    from fedlora_cli.storage.files import global_digest
    from fedlora_cli.storage.manifests import GlobalManifest, StateManifest, UpdateManifest

    recipe = recipes.from_dict(valid_recipe()).to_dict()
    digests = {"base_model.model.layer.0.lora_B.weight": "xxh128:" + "0" * 32}
    common = {"round": 2, "recipe_digest": "ab" * 32, "tensor_digests": digests}
    global_ = GlobalManifest(method="ffa", head="shared", adapter_kind="lora", base_model="pkg:m", base_fingerprint="f" * 64,
                             recipe=recipe, seed=0, num_labels=2, digest=global_digest(digests), frozen_digest=None,
                             clients=["client-0"], asked=["client-0", "client-1"], server_privacy_ledger=[[1.1, 1.0, 1]],
                             aggregation={"strategy": "mean", "clipped": [], "norm_bound": None}, **common)
    update = UpdateManifest(client_id="client-0", parent_digest=global_.digest, method="ffa", base_fingerprint="f" * 64,
                            frozen_digest=None, num_examples=10, shard_examples=12, steps=3, loss=0.5, seconds=1.0,
                            bytes=100, privacy={"accountant": "prv", "epsilon": 1.2, "delta": 1e-5, "budget": 3.0, "remaining": 1.8},
                            site={"device": "cpu", "dtype": "float32", "quantization": None,
                                  "gradient_checkpointing": False, "accumulation_steps": 1}, **common)
    ledger = {"accountant": "prv", "delta": 1e-5, "budget": 3.0, "epsilon": 1.2, "remaining": 1.8,
              "history": [[1.1, 0.01, 5], [1.1, 0.01, 5]]}
    state = StateManifest(client_id="client-0", parent_digest=global_.digest, privacy=ledger, loss=0.4, **common)
    return {"global": asdict(global_), "update": asdict(update), "state": asdict(state)}


@st.composite
def mutated(draw: st.DrawFn, valid: dict[str, Any]) -> dict[str, Any]:
    """``valid`` with one change at a key up to three mappings deep: its value replaced by junk, the key deleted,
    an unknown key added beside it, or its value wrapped in a list or a mapping."""
    data = copy.deepcopy(valid)
    target = data
    for _ in range(3):
        key = draw(st.sampled_from(sorted(target, key=str)))
        if not (isinstance(target[key], dict) and target[key] and draw(st.booleans())):
            break
        target = target[key]
    change = draw(st.sampled_from(["replace", "replace", "delete", "extra", "wrap"]))
    if change == "replace":
        target[key] = draw(JUNK)
    elif change == "delete":
        del target[key]
    elif change == "extra":
        target[draw(st.text(min_size=1, max_size=10))] = draw(JUNK)
    else:
        target[key] = draw(st.sampled_from([[target[key]], {"value": target[key]}]))
    return data


def _dumps(value: Any) -> str:
    return json.dumps(value)


# JSON texts no reader should choke on: nested far beyond any recursion limit, integers longer than Python converts
# by default (4300 digits), invalid UTF-8, a document cut short, not an object.
HOSTILE_JSON = st.one_of(
    st.integers(1, 200_000).map(lambda depth: ("[" * depth + "]" * depth).encode()),
    st.integers(1, 200_000).map(lambda depth: ('{"a":' * depth + "1" + "}" * depth).encode()),
    st.integers(4000, 20_000).map(lambda digits: ('{"round": ' + "9" * digits + "}").encode()),
    st.binary(max_size=40).map(lambda raw: b'{"round": "' + raw + b'"}'),
    st.sampled_from([b"", b"null", b"[]", b"1", b'"x"', b"{", b'{"a":NaN}', b"\xff\xfe{}", b'{"a": "\\ud800"}']),
)


def json_documents(valid: dict[str, Any]) -> st.SearchStrategy[bytes]:
    """Bytes of a JSON document: mostly ``valid`` with one change, else hostile text or raw bytes."""
    changed = mutated(valid).map(lambda d: _dumps(d).encode())
    return st.one_of(changed, changed, changed, HOSTILE_JSON, st.binary(max_size=200))


def _header_entries(draw: st.DrawFn) -> tuple[dict[str, Any], int]:
    """A well-formed safetensors header (names, dtypes, shapes, tiling offsets) and its data's length."""
    names = draw(st.lists(st.text(min_size=1, max_size=6), max_size=4, unique=True))
    header: dict[str, Any] = {}
    offset = 0
    for name in names:
        dtype = draw(st.sampled_from(sorted(DTYPE_SIZES)))
        shape = draw(st.lists(st.integers(0, 5), max_size=3))
        size = math.prod(shape) * DTYPE_SIZES[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    if draw(st.booleans()):
        header["__metadata__"] = {"format": "pt"}
    return header, offset


_ENTRY_CHANGES = ["gap", "overlap", "out_of_range", "huge_shape", "overflow_shape", "negative", "float_offset",
                  "reversed", "unknown_dtype", "missing_field", "extra_field", "wrong_type", "metadata"]


def _break_entry(draw: st.DrawFn, header: dict[str, Any], change: str) -> None:
    tensors = [n for n in header if n != "__metadata__"]
    if change == "metadata":
        header["__metadata__"] = draw(JUNK)
        return
    if not tensors:
        header[draw(st.text(min_size=1, max_size=4))] = draw(JUNK)
        return
    entry = header[draw(st.sampled_from(tensors))]
    begin, end = entry["data_offsets"]
    if change in ("gap", "overlap"):
        step = draw(st.integers(1, 16))
        entry["data_offsets"] = [begin + step, end + step] if change == "gap" else [max(begin - step, 0), end]
    elif change == "out_of_range":
        entry["data_offsets"] = [begin, end + draw(st.sampled_from([1, 1000, 2**40, 2**64 - 1, 2**64 + 5]))]
    elif change == "huge_shape":
        entry["shape"] = draw(st.lists(st.sampled_from([2**31, 2**32, 2**62, 2**63 - 1]), min_size=1, max_size=4))
    elif change == "overflow_shape":  # the product overflows 64 bits, to a small number
        entry["shape"] = [2**32, 2**32, 1 + (end - begin) // DTYPE_SIZES.get(entry["dtype"], 1)]
    elif change == "negative":
        entry[draw(st.sampled_from(["shape", "data_offsets"]))] = [-1, end]
    elif change == "float_offset":
        entry["data_offsets"] = [float(begin), end + 0.5]
    elif change == "reversed":
        entry["data_offsets"] = [end, begin]
    elif change == "unknown_dtype":
        entry["dtype"] = draw(st.sampled_from(UNKNOWN_DTYPES))
    elif change == "missing_field":
        del entry[draw(st.sampled_from(sorted(entry)))]
    elif change == "extra_field":
        entry[draw(st.text(max_size=5))] = draw(JUNK)
    else:
        entry[draw(st.sampled_from(sorted(entry)))] = draw(JUNK)


@st.composite
def safetensors_files(draw: st.DrawFn) -> bytes:
    """A safetensors file, valid or with one thing wrong in its header, its length field or its data."""
    header, size = _header_entries(draw)
    change = draw(st.sampled_from(["none", "none", *_ENTRY_CHANGES, "length_large", "length_small", "length_huge",
                                   "trailing", "truncated", "non_utf8", "deep", "digits", "not_object", "padded"]))
    if change in _ENTRY_CHANGES:
        _break_entry(draw, header, change)
    raw = json.dumps(header).encode()
    if change == "padded":  # safetensors pads its header with spaces to 8 bytes; any reader must take that
        raw += b" " * (-len(raw) % 8)
    elif change == "non_utf8":
        raw = raw.replace(b"{", b"{\"\xff\xfe\": 1, ", 1) if len(header) else b"\xff"
    elif change == "deep":
        depth = draw(st.integers(100, 100_000))
        raw = b'{"a": ' + b"[" * depth + b"]" * depth + b"}"
    elif change == "digits":
        raw = b'{"a": {"dtype": "F32", "shape": [' + b"7" * draw(st.integers(4000, 9000)) + b'], "data_offsets": [0, 0]}}'
    elif change == "not_object":
        raw = draw(st.sampled_from([b"[]", b"null", b"1", b'"x"', b""]))
    length = len(raw)
    if change == "length_large":
        length += draw(st.integers(1, 4096))
    elif change == "length_small":
        length = draw(st.integers(0, max(len(raw) - 1, 0)))
    elif change == "length_huge":
        length = draw(st.sampled_from([2**32, 2**63, 2**64 - 1, 100_000_001]))
    data = draw(st.binary(min_size=size, max_size=size))
    if change == "trailing":
        data += draw(st.binary(min_size=1, max_size=16))
    elif change == "truncated" and data:
        data = data[: draw(st.integers(0, len(data) - 1))]
    return struct.pack("<Q", length) + raw + data


def tensor_files() -> st.SearchStrategy[bytes]:
    """Bytes of a safetensors file: mostly structured, some raw, some a plausible length over random bytes."""
    prefixed = st.binary(max_size=64).map(lambda b: struct.pack("<Q", len(b)) + b)
    return st.one_of(safetensors_files(), safetensors_files(), safetensors_files(), st.binary(max_size=64), prefixed)
