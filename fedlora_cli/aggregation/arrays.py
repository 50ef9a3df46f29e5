"""The arithmetic of the ``mean`` over numpy arrays: a weighted sum added one tensor at a time, the norm every
strategy's norm bound measures, and the finiteness check.

Pure functions and one accumulator, no I/O. Used by the coordinator's mean round
(:mod:`fedlora_cli.federation.numpy_round`) and by :func:`.functions.weighted_mean`, so both give the same bits;
each step is one IEEE operation per element (the arithmetic of the torch backend this replaced, bit for bit)::

    first update       S = w_1 T_1                      in T's dtype (float32, or float64)
    each later one     S = S + (w_k T_k)                a multiply, then an add: never fused into one rounding
    after rejections   S = S / (sum of the kept w_k)
    a clipped update   T' = R + (T - R) c               before it is weighted; R what the client received

Norms are measured here for every strategy (:func:`squared_distance`, which :func:`.functions.update_norm` calls),
so the norm bound decides alike whichever strategy runs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from fedlora_cli.errors import FedloraError


def as_array(tensor: np.ndarray) -> np.ndarray:
    """A float32 or float64 array as it is; bfloat16 (:data:`fedlora_cli.storage.mapped.BF16`) or float16 widened
    to float32 exactly, anything else as a float32 copy."""
    from fedlora_cli.storage.mapped import widen

    if tensor.dtype in (np.float32, np.float64) and tensor.dtype.metadata is None:
        return tensor
    widened = widen(tensor)
    return widened if widened.dtype in (np.float32, np.float64) else tensor.astype(np.float32)


def scratch_for(tensor: np.ndarray, buffers: dict[np.dtype, np.ndarray] | None) -> np.ndarray:
    """A work array of ``tensor``'s shape in its dtype (float32 for anything but float64): a view of the matching
    buffer in ``buffers`` when one is given (kept by the caller across tensors), else a new array."""
    dtype = _work_dtype(tensor.dtype)
    buffer = None if buffers is None else buffers.get(dtype)
    if buffer is None or buffer.size < tensor.size:
        return np.empty(tensor.shape, dtype)
    return buffer[:tensor.size].reshape(tensor.shape)


def scratch_buffers(tensors: Mapping[str, np.ndarray]) -> dict[np.dtype, np.ndarray]:
    """Work buffers large enough for :func:`scratch_for` on any of ``tensors``."""
    sizes: dict[np.dtype, int] = {}
    for t in tensors.values():
        dtype = _work_dtype(t.dtype)
        sizes[dtype] = max(sizes.get(dtype, 0), t.size)
    return {dtype: np.empty(size, dtype) for dtype, size in sizes.items()}


def _work_dtype(dtype: np.dtype) -> np.dtype:
    return np.dtype(np.float64 if dtype == np.float64 else np.float32)


def squared_distance(tensor: np.ndarray, reference: np.ndarray, buffers: dict[np.dtype, np.ndarray] | None = None) -> float:
    """||tensor - reference||^2, as a Python float.

    The difference is taken in float32 (float64 for float64 tensors) into a work array and its squares summed in
    that dtype by a dot product (BLAS: the fastest reduction numpy has, and it lets go of the GIL). Where that
    overflows (a float32 difference beyond about 1.8e19 is finite, its square is not), it is taken again in
    float64. So the result is finite exactly when every element of both tensors is: a norm is also the
    finiteness check.
    """
    t, r = as_array(tensor), as_array(reference)
    d = scratch_for(t, buffers).reshape(-1)
    np.subtract(t.reshape(-1), r.reshape(-1), out=d)
    squared = float(np.dot(d, d))
    if math.isfinite(squared) or d.dtype == np.float64:
        return squared
    d = np.subtract(t.reshape(-1), r.reshape(-1), dtype=np.float64)
    return float(np.dot(d, d))


def nonfinite(arrays: Mapping[str, np.ndarray]) -> str | None:
    """The name of the first array holding NaN or Inf, or None (bfloat16 arrays widened first)."""
    for name, a in arrays.items():
        # One cheap reduction clears the usual case (a sum of squares, by the fastest reduction there is); a
        # non-finite one (NaN, Inf, or finite values whose squares overflow) is checked element by element.
        a = as_array(a) if a.dtype.metadata is not None else a
        flat = a.reshape(-1)
        if a.dtype.kind == "f" and not math.isfinite(float(np.dot(flat, flat))) and not np.isfinite(a).all():
            return name
    return None


class WeightedSum:
    """sum_k w_k T_k for each tensor name, added one tensor at a time (any order across names, the clients'
    order within each); every array of one name must have the same shape and be float32 or float64.

    ``buffers`` (:func:`scratch_buffers`) hold the weighted copy of a tensor before it is added; two threads
    adding different names at once each pass their own. ``room``, if given, holds an array for each name's sum
    (of the dtype and shape of its tensors), so the caller decides how the sums are allocated.
    """

    def __init__(self, room: Mapping[str, np.ndarray] | None = None) -> None:
        self.tensors: dict[str, np.ndarray] = {}
        self._room = dict(room or {})

    def add(self, name: str, tensor: np.ndarray, weight: float,
            buffers: dict[np.dtype, np.ndarray] | None = None) -> None:
        total = self.tensors.get(name)
        w = tensor.dtype.type(weight)  # the weight rounded to the tensor's dtype (as torch multiplied by it)
        if total is None:
            room = self._room.pop(name, None)
            fits = room is not None and room.shape == tensor.shape and room.dtype == tensor.dtype
            self.tensors[name] = np.multiply(tensor, w, out=room) if fits else np.multiply(tensor, w)
            return
        if tensor.shape != total.shape or tensor.dtype != total.dtype:
            raise FedloraError(f"tensor '{name}' differs in shape or dtype between client updates")
        weighted = scratch_for(tensor, buffers)
        np.multiply(tensor, w, out=weighted)
        np.add(total, weighted, out=total)

    def add_clipped(self, name: str, tensor: np.ndarray, reference: np.ndarray, clip: float, weight: float,
                    buffers: dict[np.dtype, np.ndarray] | None = None) -> None:
        """Add ``reference + (tensor - reference) * clip``: an update scaled down to the norm bound."""
        clipped = scratch_for(tensor, buffers)
        np.subtract(tensor, reference, out=clipped)
        np.multiply(clipped, tensor.dtype.type(clip), out=clipped)
        np.add(reference, clipped, out=clipped)
        self.add(name, clipped, weight, {clipped.dtype: clipped.reshape(-1)})

    def divide(self, divisor: float) -> None:
        """Renormalise: every sum divided by ``divisor`` (the kept updates' weights, when some were rejected)."""
        for total in self.tensors.values():
            np.divide(total, total.dtype.type(divisor), out=total)
