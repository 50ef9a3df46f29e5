"""A safetensors file as numpy arrays over its memory map: the coordinator's one reader of tensors.

The coordinator (``fedlora aggregate``: :mod:`fedlora_cli.federation.server`, :mod:`fedlora_cli.federation.numpy_round`)
reads every tensor file through here: the global checkpoint (:func:`fedlora_cli.storage.load_verified` with
``framework="numpy"``), each client update (mapped whole by the mean's one-pass round; screened in full, then read
back one tensor at a time, :meth:`Layout.read`, by the other strategies), its server state. Why not the
safetensors library's own numpy reader (``safe_open(path, framework="numpy")``), measured on this project's 2-core
machine (2026-12-07, benchmarks/results/RESULTS.md):

- it refuses bfloat16 (``TypeError: data type 'bfloat16' not understood``), the dtype LLM adapters are most often
  trained in: numpy has no bfloat16. Here a bfloat16 tensor is an array of its raw 16-bit patterns with the dtype
  :data:`BF16` (uint16, tagged), which :func:`widen` turns into float32 exactly (the bits shifted left by 16) and
  :func:`narrow` rounds back to, to the nearest even as torch rounds; its digest and the file written from it name
  it bfloat16, as torch's do;
- it hands out a copy of each tensor. For one pass that reads and digests every tensor it costs nothing
  measurable (8 LLaMA-7B-shaped updates of 67 MB, page cache warm: 0.19 s against 0.18 s mapped, the same peak
  memory, since each copy is dropped at once), but the mean's round visits four updates at once, tensor by tensor
  (:mod:`fedlora_cli.federation.numpy_round`), over mapped pages it never copies.

The format is parsed as strictly as the library parses it: an 8-byte little-endian header length, a JSON header of
names, dtypes, shapes and byte offsets that must tile the data exactly (no gaps, no overlaps, nothing after the
last tensor). Nothing is unpickled, and a file that is not this is a :class:`FedloraError`.

The arrays are read-only views of the file as it is on disk *while they are read*: a caller that must know the
bytes it used are the ones the manifest describes checks each tensor's digest after its last use of it, so a
file changed in between cannot pass unnoticed. The mapping is released when the last array over it is dropped.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedlora_cli.errors import FedloraError

# bfloat16 as numpy holds it: its 16-bit patterns, as uint16 tagged so that digests, files and widen() know it.
BF16 = np.dtype(np.uint16, metadata={"safetensors": "BF16"})
# safetensors' dtype codes that numpy holds as they are stored (little-endian); bfloat16 as its raw bits.
_DTYPES = {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": BF16,
           "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
           "U8": np.dtype("u1"), "BOOL": np.dtype("?")}
# The safetensors library's own limit on the header (100 MB): a larger length field is a corrupted file.
_MAX_HEADER = 100_000_000


class _Malformed(ValueError):
    """What is wrong with a file that is not safetensors; reported as a :class:`FedloraError`."""


@dataclass(frozen=True)
class Layout:
    """Where each tensor of a safetensors file lies: its header, parsed and checked once."""

    path: Path
    start: int  # the first byte of the data, after the header
    entries: dict[str, tuple[str, tuple[int, ...], int, int]]  # name -> (dtype code, shape, begin, end) in the data

    def read(self, name: str, fd: int | None = None) -> np.ndarray | None:
        """One tensor, read (copied) from the file at its offsets (through ``fd``, an open descriptor of it, if
        given): no mapping is held, so no page of the file stays resident in this process. None when the file no
        longer holds those bytes."""
        code, shape, begin, end = self.entries[name]
        if fd is None:
            with open(self.path, "rb") as handle:
                return self.read(name, handle.fileno())
        data = os.pread(fd, end - begin, self.start + begin)
        if len(data) != end - begin:
            return None
        return np.frombuffer(data, numpy_dtype(code)).reshape(shape)

    def read_into(self, handle: Any, name: str, out: np.ndarray) -> bool:
        """One tensor read from the open file ``handle`` into ``out`` (of its dtype and shape); False when the file
        no longer holds its bytes (truncated since the header was read)."""
        _, _, begin, end = self.entries[name]
        view, done = memoryview(out.reshape(-1).view(np.uint8)), 0
        while done < end - begin:
            got = os.preadv(handle.fileno(), [view[done:]], self.start + begin + done)
            if got == 0:
                return False
            done += got
        return True

    def empty(self) -> dict[str, np.ndarray]:
        """Writable arrays of every tensor's dtype and shape, carved out of one allocation (:func:`empty_arrays`)."""
        return empty_arrays({name: (numpy_dtype(code), shape) for name, (code, shape, _, _) in self.entries.items()})

    def read_all(self, what: str) -> dict[str, np.ndarray]:
        """Every tensor, read into memory (one allocation). A file cut short meanwhile (another process truncating
        it) is a :class:`FedloraError`: read, never mapped, so it cannot kill the process with SIGBUS."""
        tensors = self.empty()
        try:
            with open(self.path, "rb") as handle:
                complete = all(self.read_into(handle, name, t) for name, t in tensors.items())
        except OSError as exc:
            raise FedloraError(f"{what} {self.path} is not readable ({exc.strerror})") from None
        if not complete:
            raise FedloraError(f"{what} {self.path} was cut short while it was read (changed by another process)")
        return tensors


def read_layout(path: Path, what: str) -> Layout:
    """The layout of a safetensors file, every field checked (the tensors must tile the data exactly)."""
    path = Path(path)
    if not path.is_file():
        raise FedloraError(f"{what} not found: {path}")
    try:
        with open(path, "rb") as handle:
            size = handle.seek(0, 2)
            if size < 8:
                raise _Malformed(f"{size} bytes, shorter than a header")
            handle.seek(0)
            header_size = int.from_bytes(handle.read(8), "little")
            if header_size > min(_MAX_HEADER, size - 8):
                raise _Malformed(f"header length {header_size} does not fit in the file")
            entries = _entries(handle.read(header_size))
        _check_tiling(entries, size - 8 - header_size)
    except (OSError, _Malformed) as exc:
        raise FedloraError(f"{what} {path} is not a readable safetensors file ({exc})") from None
    return Layout(path, 8 + header_size, entries)


def _check_tiling(entries: Mapping[str, tuple[str, tuple[int, ...], int, int]], data_size: int) -> None:
    end = 0
    for name, (dtype, shape, begin, stop) in sorted(entries.items(), key=lambda e: e[1][2:]):
        if begin != end:
            raise _Malformed(f"tensor {name!r} starts at byte {begin}, not {end}: the data has a gap or an overlap")
        if stop > data_size:
            raise _Malformed(f"tensor {name!r} ends at byte {stop}, past the end of the data ({data_size})")
        if stop - begin != math.prod(shape) * numpy_dtype(dtype).itemsize:
            raise _Malformed(f"tensor {name!r} has {stop - begin} bytes for {dtype}{list(shape)}")
        end = stop
    if end != data_size:
        raise _Malformed(f"{data_size - end} bytes after the last tensor")


def read_tensors(path: Path, what: str) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as numpy arrays read into memory (unchecked against any digest: that is
    the caller's job). bfloat16 tensors are :data:`BF16` arrays of their bits; other dtypes numpy does not hold
    (float8) are refused.

    Read, not memory-mapped: a file another process truncates while a mapping of it is read kills the reader with
    SIGBUS (issue 28), while a read that comes up short is one line."""
    return read_layout(path, what).read_all(what)


def _entries(raw: bytes) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
    """name -> (dtype, shape, begin, end) from a safetensors header, every field checked."""
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):  # also an integer of thousands of digits, or nesting past the stack
        raise _Malformed("the header is not JSON") from None
    if not isinstance(header, dict):
        raise _Malformed("the header is not a JSON object")
    entries = {}
    for name, entry in header.items():
        if name == "__metadata__":  # as the library reads it: absent, null, or text -> text
            if entry is not None and not (isinstance(entry, dict) and all(isinstance(v, str) for v in entry.values())):
                raise _Malformed("its __metadata__ is not a mapping of text to text")
            continue
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise _Malformed(f"tensor {name!r} has a malformed header entry")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise _Malformed(f"tensor {name!r} has dtype {dtype!r:.20}, which numpy does not hold")
        if not isinstance(shape, list) or not all(_natural(n) for n in shape):
            raise _Malformed(f"tensor {name!r} has a malformed shape")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_natural(n) for n in offsets) \
                or offsets[0] > offsets[1]:
            raise _Malformed(f"tensor {name!r} has malformed data offsets")
        entries[name] = (dtype, tuple(shape), offsets[0], offsets[1])
    return entries


def _natural(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def empty_like(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Uninitialised writable arrays of the same names, dtypes and shapes (:func:`empty_arrays`)."""
    return empty_arrays({name: (a.dtype, a.shape) for name, a in arrays.items()})


def empty_arrays(specs: Mapping[str, tuple[np.dtype, tuple[int, ...]]]) -> dict[str, np.ndarray]:
    """Uninitialised writable arrays of these names, dtypes and shapes, carved out of one allocation: large
    enough for the kernel to back it with huge pages, where an allocation per tensor costs more in page faults
    than filling it does."""
    offsets, size = {}, 0
    for name, (dtype, shape) in specs.items():
        offsets[name] = size
        size += -(-math.prod(shape) * dtype.itemsize // 64) * 64  # each array starts on a cache line
    block = np.empty(size, np.uint8)
    return {name: block[o:o + math.prod(specs[name][1]) * specs[name][0].itemsize].view(specs[name][0])
            .reshape(specs[name][1]) for name, o in offsets.items()}


def numpy_dtype(code: str) -> np.dtype:
    """The numpy dtype of a safetensors dtype code: :data:`BF16` for "BF16"."""
    return _DTYPES[code]


def is_bf16(array: np.ndarray) -> bool:
    metadata = array.dtype.metadata
    return metadata is not None and metadata.get("safetensors") == "BF16"


def dtype_name(array: np.ndarray) -> str:
    """The dtype's name as torch and safetensors spell it ('float32', 'bfloat16')."""
    return "bfloat16" if is_bf16(array) else array.dtype.name


def widen(array: np.ndarray) -> np.ndarray:
    """A tensor in the dtype aggregation computes in, exactly: bfloat16 and float16 as float32 (a new array),
    float32 and float64 as they are (the same array)."""
    if is_bf16(array):
        return (array.astype(np.uint32) << 16).view(np.float32)
    if array.dtype == np.float16:
        return array.astype(np.float32)
    return array


def narrow(array: np.ndarray, code: str) -> np.ndarray:
    """A float32 or float64 array rounded to the safetensors dtype ``code`` (to nearest, ties to even, as torch
    rounds; a NaN stays a NaN), or the same array when it is of that dtype already."""
    if code != "BF16":
        return array.astype(numpy_dtype(code), copy=False)
    bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
    rounded = ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16).astype(np.uint16)
    nan = np.isnan(array)
    rounded[nan] = (bits[nan] >> 16).astype(np.uint16) | 0x0040  # quiet, whatever the rounding would carry into
    return rounded.view(numpy_dtype("BF16"))
