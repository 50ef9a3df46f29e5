"""How a client update's tensors travel (``federation.update_encoding``): numpy only, the same code at the client
that encodes and at the coordinator that decodes, so decoding is deterministic on every path (simulate, the
by-hand ``aggregate``, Flower: all read the same files).

- ``float32`` (the default): the sent tensors as they are, in their own dtype, exactly what fedlora always wrote.
- ``bfloat16``: the *difference* between the sent tensors and what the client received (the global's values at its
  rank), rounded to bfloat16 (to nearest, ties to even), stored as ``NAME::delta``: half the bytes of float32.
- ``int8``: that difference in blocks of :data:`BLOCK` values along the flattened tensor, each block scaled by its
  largest magnitude (absmax / 127, one float32 per block) and rounded to the nearest int8 code: ``NAME::q`` (int8,
  the tensor's shape) and ``NAME::scale`` (float32, one per block): about a quarter of the bytes of float32.

The coordinator rebuilds ``received + decode(parts)`` in float32 (one multiplication per value, bfloat16 widened
exactly); everything after it (validation, the norm bound, every strategy) sees ordinary tensors. Digests cover the
encoded parts as written. The names carry ``::``, which no PEFT tensor name holds, and the update manifest records
its encoding, so encoded parts cannot pass for adapter tensors.

Error feedback (Seide et al., "1-bit stochastic gradient descent", Interspeech 2014; Karimireddy et al., "Error
feedback fixes SignSGD", ICML 2019): the rounding error of a round, delta - decode(encode(delta)), is kept in the
client's state (``NAME::residual``, never sent) and added to the next round's delta before it is encoded, so over
rounds the decoded deltas sum to the true ones up to the last round's residual.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from fedlora_cli.errors import FedloraError

RAW = "float32"
ENCODINGS = (RAW, "bfloat16", "int8")  # recipe.schema.UPDATE_ENCODINGS
BLOCK = 256  # int8: values per scale (a float32 scale per 256 codes adds 1.6% to the codes' bytes)
SEPARATOR = "::"
RESIDUAL = "residual"  # the client state's error-feedback tensors: NAME::residual
_PARTS = {"bfloat16": ("delta",), "int8": ("q", "scale")}


def part_name(name: str, part: str) -> str:
    return f"{name}{SEPARATOR}{part}"


def residual_name(name: str) -> str:
    return part_name(name, RESIDUAL)


def is_residual(name: str) -> bool:
    return name.endswith(SEPARATOR + RESIDUAL)


def parts_of(name: str, encoding: str) -> tuple[str, ...]:
    """The stored names of one sent tensor: itself (float32), or its encoded parts."""
    return (name,) if encoding == RAW else tuple(part_name(name, p) for p in _PARTS[encoding])


def sent_names(stored: Iterable[str], encoding: str) -> list[str]:
    """The sent tensors' names (sorted) behind an update's stored names."""
    if encoding == RAW:
        return sorted(stored)
    return sorted({name.rsplit(SEPARATOR, 1)[0] for name in stored})


def _blocks(size: int) -> int:
    return -(-size // BLOCK)


def stored_header(expected: Mapping[str, tuple[str, tuple[int, ...]]],
                  encoding: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The dtype codes and shapes an update's file must hold, given those of the tensors it sends."""
    if encoding == RAW:
        return dict(expected)
    header = {}
    for name, (_, shape) in expected.items():
        shape = tuple(shape)
        if encoding == "bfloat16":
            header[part_name(name, "delta")] = ("BF16", shape)
        else:
            header[part_name(name, "q")] = ("I8", shape)
            header[part_name(name, "scale")] = ("F32", (_blocks(int(np.prod(shape))),))
    return header


def encode(name: str, delta: np.ndarray, encoding: str) -> dict[str, np.ndarray]:
    """One tensor's difference from what the client received, encoded: its stored parts by name."""
    from fedlora_cli.storage.mapped import narrow

    delta = np.ascontiguousarray(delta, dtype=np.float32)
    if encoding == "bfloat16":
        return {part_name(name, "delta"): narrow(delta, "BF16")}
    if encoding != "int8":
        raise FedloraError(f"unknown update encoding {encoding!r}; expected one of {', '.join(ENCODINGS[1:])}")
    flat = delta.reshape(-1)
    padded = np.zeros(_blocks(flat.size) * BLOCK, np.float32)
    padded[:flat.size] = flat
    blocks = padded.reshape(-1, BLOCK)
    scale = (np.abs(blocks).max(axis=1) / np.float32(127)).astype(np.float32)
    divisor = np.where(scale > 0, scale, np.float32(1)).astype(np.float64)
    codes = np.clip(np.rint(blocks.astype(np.float64) / divisor[:, None]), -127, 127).astype(np.int8)
    return {part_name(name, "q"): codes.reshape(-1)[:flat.size].reshape(delta.shape),
            part_name(name, "scale"): scale}


def decode(name: str, stored: Mapping[str, np.ndarray], encoding: str) -> np.ndarray:
    """One tensor's difference, decoded from its stored parts: float32, the same bits wherever it is decoded."""
    from fedlora_cli.storage.mapped import widen

    if encoding == "bfloat16":
        return widen(stored[part_name(name, "delta")])
    codes, scale = stored[part_name(name, "q")], stored[part_name(name, "scale")]
    flat = codes.reshape(-1).astype(np.float32)
    per_value = np.repeat(np.asarray(scale, np.float32), BLOCK)[:flat.size]
    return (flat * per_value).reshape(codes.shape)


def encode_update(deltas: Mapping[str, np.ndarray],
                  encoding: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Every sent tensor's difference encoded: (stored parts by name, each tensor's rounding error
    delta - decode(encode(delta)), which error feedback carries to the next round)."""
    stored, residuals = {}, {}
    for name, delta in deltas.items():
        parts = encode(name, delta, encoding)
        stored.update(parts)
        residuals[name] = (np.asarray(delta, np.float32) - decode(name, parts, encoding)).astype(np.float32)
    return stored, residuals


def decode_update(stored: Mapping[str, np.ndarray], encoding: str,
                  received: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The sent tensors rebuilt at the coordinator: what the client received (widened) plus its decoded
    difference; the stored tensors as they are for ``float32``."""
    if encoding == RAW:
        return dict(stored)
    return {name: received[name] + decode(name, stored, encoding) for name in sent_names(stored, encoding)}
