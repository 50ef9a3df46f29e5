"""The coordinator's round when it is the plain weighted mean: numpy from the first byte read to the last byte
written, and torch never imported (issue 17: a process that spends a second or more importing torch cannot
aggregate at the speed of memory).

``aggregate_round`` takes this path when the round's strategy is ``mean`` itself (not wrapped by DP-FedAvg or
a server optimiser, which draw noise and keep moments in torch) and every tensor it reads or writes is float32
or float64 (:func:`applies`). The norm bound needs only norms, so it works here too; svd, exact, median and
trimmed-mean stay on the torch path. Every check of the torch path happens here, with fewer passes over the
bytes:

- the manifests and tensor headers are validated up front, by the same code (``read_updates``);
- each update is memory-mapped (:func:`fedlora_cli.storage.mapped.map_tensors`), not copied out, and its
  mapped header must still be the one validated;
- each tensor is visited once while its bytes are in the CPU's cache: its difference from what the client
  received and the squared norm of that (finite exactly when the tensor is: the NaN/Inf check), its weighted add
  into the running sum, then its digest against the manifest. The digest comes *after* the tensor's last use,
  so bytes that changed on disk in between cannot be averaged unnoticed;
- with a norm bound the whole update's norm must be known before any of it is added: a first visit measures,
  a second adds (clipped, if so) and checks the digests;
- two threads share the tensors of each update, alternate names each. The sum of one name still runs over the
  clients in their order, so the result does not depend on the threads, and is bit-identical to the torch
  path's (:mod:`fedlora_cli.aggregation.arrays`).

Memory: the global's tensors, the running sum, and the pages of at most two mapped updates (the one being
averaged and the next, mapped meanwhile): flat in the number of clients.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from fedlora_cli import storage
from fedlora_cli.aggregation.norm_bound import REJECTED, NormBound, Verdict
from fedlora_cli.errors import FedloraError

if TYPE_CHECKING:
    import numpy as np

    from fedlora_cli.aggregation.strategy import Strategy

_THREADS = 2  # the old path used two as well: one read and hashed the next update while the other averaged


def applies(strategy: Strategy, dtypes: Sequence[str]) -> bool:
    """Whether a round with this strategy over tensors of these safetensors dtypes (every one the round reads or
    writes) is numpy's: the plain mean, unwrapped, over float32 and float64."""
    from fedlora_cli.aggregation import Mean
    from fedlora_cli.aggregation.arrays import DTYPES

    return type(strategy) is Mean and all(dtype in DTYPES for dtype in dtypes)


def weighted_mean(
    updates: Sequence[storage.ClientUpdate], weights: Sequence[float], reference: Mapping[str, np.ndarray],
    expected: Mapping[str, tuple[str, tuple[int, ...]]], bound: NormBound,
    record: Callable[[storage.ClientUpdate, float, Verdict], None],
) -> dict[str, np.ndarray]:
    """The mean of the updates' tensors under the norm bound, each update checked in full (digests, finite
    values, its header still ``expected``), renormalised over the kept weights when the bound rejected some.

    ``reference`` holds what every client received (the global's values of the sent tensors); ``record`` is
    told each update's weight and verdict, in order. Empty when every update was rejected.
    """
    from fedlora_cli.aggregation.arrays import WeightedSum, scratch_buffers

    names = sorted(expected)
    halves = [half for half in (names[0::2], names[1::2]) if half]
    buffers = [scratch_buffers({n: reference[n] for n in half}) for half in halves]
    sums, kept, rejected = WeightedSum(), [], False
    bounded = bound.bound is not None
    with ThreadPoolExecutor(max_workers=_THREADS) as pool:

        def visit(mapped: _Mapped, **how: Any) -> list[Future[dict[str, float]]]:
            return [pool.submit(mapped.visit, half, scratch, **how) for half, scratch in zip(halves, buffers)]

        following = _Mapped.of(updates[0], expected, reference)
        for i, (update, weight) in enumerate(zip(updates, weights)):
            mapped = following
            if isinstance(mapped, FedloraError):
                raise mapped
            # Without a bound, one visit does everything; with one, nothing is added before the norm is known.
            measuring = visit(mapped, measure=True, add=None if bounded else (sums, weight, 1.0), check=not bounded)
            # The next update is mapped (and its header checked) while this one is visited.
            following = _Mapped.of(updates[i + 1], expected, reference) if i + 1 < len(updates) else None
            squared = {name: sq for part in measuring for name, sq in part.result().items()}
            # Summed in name order, as functions.update_norm sums them: both paths judge the same norm.
            verdict = bound.verdict(sum(squared[n] for n in names) ** 0.5)
            if bounded:
                adding = None if verdict.bound == REJECTED else (sums, weight, verdict.clip)
                for part in visit(mapped, add=adding, check=True):
                    part.result()
            record(update, weight, verdict)
            if verdict.bound == REJECTED:
                rejected = True
            else:
                kept.append(weight)
            del mapped  # unmapped now: at most this update's pages and the next one's are ever resident
    if rejected and sums.tensors:
        sums.divide(sum(kept))  # summed as Mean sums the accepted weights (sum() is compensated from Python 3.12)
    return sums.tensors


class _Mapped:
    """One client update, memory-mapped, its tensors visited (measured, added, checked) by name."""

    def __init__(self, update: storage.ClientUpdate, expected: Mapping[str, tuple[str, tuple[int, ...]]],
                 reference: Mapping[str, np.ndarray]) -> None:
        import numpy as np

        from fedlora_cli.storage.mapped import NUMPY_DTYPES, map_tensors

        self.update, self.reference = update, reference
        self.arrays = map_tensors(update.tensors_path, "client update tensors")
        same = set(self.arrays) == set(expected) and all(
            self.arrays[n].dtype == np.dtype(NUMPY_DTYPES[dtype]) and self.arrays[n].shape == tuple(shape)
            for n, (dtype, shape) in expected.items()
        )
        if not same:
            raise FedloraError(f"client update {update.path}: its tensor file changed while aggregating")

    @classmethod
    def of(cls, update: storage.ClientUpdate, expected: Mapping[str, tuple[str, tuple[int, ...]]],
           reference: Mapping[str, np.ndarray]) -> _Mapped | FedloraError:
        """The update mapped, or why it cannot be: mapped ahead of its turn, it is refused in its turn, so a round
        reports the first bad update first, as the torch path does."""
        try:
            return cls(update, expected, reference)
        except FedloraError as exc:
            return exc

    def visit(self, names: Sequence[str], buffers: dict[Any, np.ndarray], measure: bool = False,
              add: tuple[Any, float, float] | None = None, check: bool = False) -> dict[str, float]:
        """For each name in one visit: its squared distance from the reference if ``measure``, its weighted add if
        ``add`` = (sums, weight, clip), then, if ``check``, its digest. Returns the squared distances measured."""
        from fedlora_cli.aggregation.arrays import squared_distance

        squared = {}
        for name in names:
            t = self.arrays[name]
            if measure:
                squared[name] = squared_distance(t, self.reference[name], buffers)
                if not math.isfinite(squared[name]):
                    self._check_finite(name)
            if add is not None:
                sums, weight, clip = add
                if clip == 1.0:
                    sums.add(name, t, weight, buffers)
                else:
                    sums.add_clipped(name, t, self.reference[name], clip, weight, buffers)
            if check:
                self._check_digest(name)
        return squared

    def _check_digest(self, name: str) -> None:
        storage.check_digest(self.arrays[name], self.update.manifest.tensor_digests[name],
                             f"client update tensors {self.update.tensors_path}: tensor '{name}'")

    def _check_finite(self, name: str) -> None:
        """A tensor whose distance is not finite: refused as not matching its digest if it does not (a damaged
        file is that first), else for its NaN or Inf. (An infinite distance between finite tensors is possible
        only in float64, beyond 1e154, and is left to the norm bound.)"""
        import numpy as np

        self._check_digest(name)
        if not np.isfinite(self.arrays[name]).all():
            raise FedloraError(f"client update {self.update.path}: tensor '{name}' holds NaN or Inf")

