"""A safetensors file as numpy arrays over its memory map: no copy out of the page cache.

The coordinator's mean round (:mod:`fedlora_cli.federation.numpy_round`) reads each client update this way, so
the only pass over an update's bytes is the one that averages them (and the digest that checks them). The
format is parsed here, not by the safetensors library, because the library hands numpy a copy of every tensor;
the parse is as strict as the library's: an 8-byte little-endian header length, a JSON header of names,
dtypes, shapes and byte offsets that must tile the data exactly (no gaps, no overlaps, nothing after the last
tensor). Nothing is unpickled, and a file that is not this is a :class:`FedloraError`.

The arrays are read-only views of the file as it is on disk *while they are read*: a caller that must know the
bytes it used are the ones the manifest describes checks each tensor's digest after its last use of it, so a
file changed in between cannot pass unnoticed. The mapping is released when the last array over it is dropped.
"""

from __future__ import annotations

import json
import math
import mmap
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedlora_cli.errors import FedloraError

if TYPE_CHECKING:
    import numpy as np

# safetensors' dtype codes that numpy holds as they are stored (little-endian).
NUMPY_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
                "U8": "u1", "BOOL": "?"}
# The safetensors library's own limit on the header (100 MB): a larger length field is a corrupted file.
_MAX_HEADER = 100_000_000


class _Malformed(ValueError):
    """What is wrong with a file that is not safetensors; reported as a :class:`FedloraError`."""


def map_tensors(path: Path, what: str) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file, as a read-only numpy array over the file's memory map (unchecked
    against any digest: that is the caller's job). Tensors of a dtype numpy does not hold (bfloat16, float8) are
    refused."""
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise FedloraError(f"{what} not found: {path}")
    try:
        with open(path, "rb") as handle:
            size = handle.seek(0, 2)
            if size < 8:
                raise _Malformed(f"{size} bytes, shorter than a header")
            mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        header_size = int.from_bytes(mapped[:8], "little")
        if header_size > min(_MAX_HEADER, size - 8):
            raise _Malformed(f"header length {header_size} does not fit in the file")
        entries = _entries(mapped[8:8 + header_size])
        start, data_size = 8 + header_size, size - 8 - header_size
        arrays = {}
        end = 0
        for name, (dtype, shape, begin, stop) in sorted(entries.items(), key=lambda e: e[1][2:]):
            if begin != end:
                raise _Malformed(f"tensor '{name}' starts at byte {begin}, not {end}: the data has a gap or an overlap")
            dt = np.dtype(NUMPY_DTYPES[dtype])
            if stop > data_size:
                raise _Malformed(f"tensor '{name}' ends at byte {stop}, past the end of the data ({data_size})")
            if stop - begin != math.prod(shape) * dt.itemsize:
                raise _Malformed(f"tensor '{name}' has {stop - begin} bytes for {dtype}{shape}")
            arrays[name] = np.frombuffer(mapped, dt, math.prod(shape), start + begin).reshape(shape)
            end = stop
        if end != data_size:
            raise _Malformed(f"{data_size - end} bytes after the last tensor")
    except (OSError, _Malformed) as exc:
        raise FedloraError(f"{what} {path} is not a readable safetensors file ({exc})") from None
    return arrays


def _entries(raw: bytes) -> dict[str, tuple[str, list[int], int, int]]:
    """name -> (dtype, shape, begin, end) from a safetensors header, every field checked."""
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _Malformed("the header is not JSON") from None
    if not isinstance(header, dict):
        raise _Malformed("the header is not a JSON object")
    entries = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise _Malformed(f"tensor '{name}' has a malformed header entry")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in NUMPY_DTYPES:
            raise _Malformed(f"tensor '{name}' has dtype {dtype!r:.20}, which numpy does not hold")
        if not isinstance(shape, list) or not all(_natural(n) for n in shape):
            raise _Malformed(f"tensor '{name}' has a malformed shape")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_natural(n) for n in offsets) \
                or offsets[0] > offsets[1]:
            raise _Malformed(f"tensor '{name}' has malformed data offsets")
        entries[name] = (dtype, shape, offsets[0], offsets[1])
    return entries


def _natural(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def empty_like(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Uninitialised writable arrays of the same names, dtypes and shapes, carved out of one allocation: large
    enough for the kernel to back it with huge pages, where an allocation per tensor costs more in page faults
    than filling it does."""
    import numpy as np

    offsets, size = {}, 0
    for name, a in arrays.items():
        offsets[name] = size
        size += -(-a.nbytes // 64) * 64  # each array starts on a cache line
    block = np.empty(size, np.uint8)
    return {name: block[offset:offset + arrays[name].nbytes].view(arrays[name].dtype).reshape(arrays[name].shape)
            for name, offset in offsets.items()}
