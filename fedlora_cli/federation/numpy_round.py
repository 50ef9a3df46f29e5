"""The coordinator's weighted mean over the client update files: numpy from the first byte read to the last byte
added (issue 17: a process that spends a second or more importing torch cannot aggregate at the speed of memory).

Every strategy's coordinator is numpy (:mod:`fedlora_cli.federation.server`); this module is how the ``mean``
(:class:`fedlora_cli.aggregation.Mean`, through :meth:`fedlora_cli.aggregation.Contributions.weighted_mean`,
also under a server optimiser) gets there in the fewest passes over the bytes, with every check the other
strategies' reading makes:

- the manifests and tensor headers are validated up front, by the same code (``read_updates``);
- each update is memory-mapped (:func:`fedlora_cli.storage.mapped.map_tensors`), not copied out, and its
  mapped header must still be the one validated; bfloat16 and float16 tensors are widened to float32 exactly
  (:func:`fedlora_cli.storage.mapped.widen`), one tensor at a time;
- each tensor is visited once while its bytes are in the CPU's cache: its difference from what the client
  received and the squared norm of that (finite exactly when the tensor is: the NaN/Inf check), its weighted add
  into the running sum, then its digest against the manifest. The digest comes *after* the tensor's last use,
  so bytes that changed on disk in between cannot be averaged unnoticed;
- with a norm bound the whole update's norm must be known before any of it is added: a first visit measures
  and checks the digests (so the norm is judged on checked bytes), a second adds (clipped, if so) and checks
  them again;
- updates go in groups of four, tensor by tensor: one name's running sum and reference are read from memory
  once for the four updates of a group rather than once for each. Each update's own bytes must come from memory
  anyway; the sum (read and written) and reference are three quarters of the traffic one update at a time, under
  half in groups of four (on one core, 2026-12-01: 27 ms per update against 30 in pairs; 24 in groups of eight,
  which keep twice the pages mapped);
- two threads share the tensor names, alternate names each. The sum of one name still runs over the clients in
  their order, so the result does not depend on the threads or the grouping, and is bit-identical to
  :func:`fedlora_cli.aggregation.weighted_mean` over the same updates (:mod:`fedlora_cli.aggregation.arrays`).
  When several updates are bad, the first one is named.

Memory: the global's tensors, the running sum, and the pages of the group being averaged (the next group is
mapped meanwhile, its pages touched only in its turn): flat in the number of clients.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedlora_cli import storage
from fedlora_cli.aggregation.norm_bound import REJECTED, NormBound, Verdict
from fedlora_cli.errors import FedloraError

if TYPE_CHECKING:
    import numpy as np

_THREADS = 2  # as the screened path: one reads and hashes the next update while the other aggregates
_GROUP = 4  # updates visited together


def weighted_mean(
    updates: Sequence[storage.ClientUpdate], weights: Sequence[float], reference: Mapping[str, np.ndarray],
    expected: Mapping[str, tuple[str, tuple[int, ...]]], bound: NormBound,
    record: Callable[[storage.ClientUpdate, float, Verdict], None],
) -> dict[str, np.ndarray]:
    """The mean of the updates' tensors under the norm bound, each update checked in full (digests, finite
    values, its header still ``expected``), renormalised over the kept weights when the bound rejected some.

    ``reference`` holds what every client received (the global's values of the sent tensors, widened to float32
    or float64); ``record`` is told each update's weight and verdict, in order. Empty when every update was
    rejected. The sums are float32 (float64 for float64 tensors).
    """
    from fedlora_cli.aggregation.arrays import WeightedSum, scratch_buffers
    from fedlora_cli.storage.mapped import empty_like

    names = sorted(expected)
    halves = [half for half in (names[0::2], names[1::2]) if half]
    buffers = [scratch_buffers({n: reference[n] for n in half}) for half in halves]
    sums, kept, rejected = WeightedSum(room=empty_like({n: reference[n] for n in names})), [], False
    bounded = bound.bound is not None
    groups = [list(zip(updates[i:i + _GROUP], weights[i:i + _GROUP])) for i in range(0, len(updates), _GROUP)]
    with ThreadPoolExecutor(max_workers=_THREADS) as pool:
        visit = functools.partial(_start, pool, halves, buffers)
        following = [_Mapped.of(update, expected, reference) for update, _ in groups[0]]
        for i, group in enumerate(groups):
            mapped = following
            ready = list(itertools.takewhile(lambda m: isinstance(m, _Mapped), mapped))
            # Without a bound, one visit does everything; with one, nothing is added before the norm is known, and
            # both visits check the digests: the norm is judged on checked bytes, and so is what is then added.
            measured = visit([_Visit(m, measure=True, add=None if bounded else (sums, w, 1.0), check=True)
                              for m, (_, w) in zip(ready, group)])
            # The next group is mapped (and its headers checked) while this one is visited.
            following = [_Mapped.of(u, expected, reference) for u, _ in groups[i + 1]] if i + 1 < len(groups) else []
            squared = measured()
            if len(ready) < len(mapped):
                raise mapped[len(ready)]  # refused when mapped, in its turn
            # Summed in name order, as functions.update_norm sums them: both paths judge the same norm.
            verdicts = [bound.verdict(sum(sq[n] for n in names) ** 0.5) for sq in squared]
            if bounded:
                visit([_Visit(m, add=None if v.bound == REJECTED else (sums, w, v.clip), check=True)
                       for m, (_, w), v in zip(ready, group, verdicts)])()
            for (update, weight), verdict in zip(group, verdicts):
                record(update, weight, verdict)
                if verdict.bound == REJECTED:
                    rejected = True
                else:
                    kept.append(weight)
            del mapped, ready  # unmapped now: only the next group is still mapped
    if rejected and sums.tensors:
        sums.divide(sum(kept))  # summed as Mean sums the accepted weights (sum() is compensated from Python 3.12)
    return sums.tensors


def _start(pool: ThreadPoolExecutor, halves: Sequence[Sequence[str]], buffers: Sequence[dict[Any, np.ndarray]],
           visits: list[_Visit]) -> Callable[[], list[dict[str, float]]]:
    """Start the visits on both threads, each over its half of the names; the returned call waits for them and
    raises the first update's refusal, if any, else gives each update's squared distances by name."""
    parts = [pool.submit(_visit, half, scratch, visits) for half, scratch in zip(halves, buffers)]

    def outcome() -> list[dict[str, float]]:
        by_update = list(zip(*(part.result() for part in parts)))  # each update's results from both halves
        for results in by_update:
            refused = next((r for r in results if isinstance(r, FedloraError)), None)
            if refused is not None:
                raise refused
        return [{name: sq for result in results for name, sq in result.items()} for results in by_update]

    return outcome


@dataclass(frozen=True)
class _Visit:
    """What to do with each tensor of one mapped update: measure its distance from the reference, add it (to
    ``add`` = (sums, weight, clip)), check its digest."""

    mapped: _Mapped
    measure: bool = False
    add: tuple[Any, float, float] | None = None
    check: bool = False


def _visit(names: Sequence[str], buffers: dict[Any, np.ndarray],
           visits: Sequence[_Visit]) -> list[dict[str, float] | FedloraError]:
    """The visits, name by name and, within a name, update by update (so the name's sum and reference stay in
    the CPU's cache across the updates). Per update, its squared distances, or the refusal that stopped it."""
    results: list[dict[str, float] | FedloraError] = [{} for _ in visits]
    for name in names:
        for k, v in enumerate(visits):
            if isinstance(results[k], FedloraError):
                continue
            try:
                squared = v.mapped.visit(name, buffers, v.measure, v.add, v.check)
            except FedloraError as exc:
                results[k] = exc
                continue
            if squared is not None:
                results[k][name] = squared
    return results


class _Mapped:
    """One client update, memory-mapped, its tensors visited (measured, added, checked) by name."""

    def __init__(self, update: storage.ClientUpdate, expected: Mapping[str, tuple[str, tuple[int, ...]]],
                 reference: Mapping[str, np.ndarray]) -> None:
        from fedlora_cli.storage.encoding import RAW, decode_update, stored_header
        from fedlora_cli.storage.mapped import map_tensors, numpy_dtype

        self.update, self.reference, self.encoding = update, reference, update.manifest.encoding
        self.stored = map_tensors(update.tensors_path, "client update tensors")
        self._where = f"client update tensors {update.tensors_path}"  # once: a path is slow to join and format
        stored = stored_header(expected, self.encoding)
        same = set(self.stored) == set(stored) and all(
            _same_dtype(self.stored[n].dtype, numpy_dtype(dtype)) and self.stored[n].shape == tuple(shape)
            for n, (dtype, shape) in stored.items()
        )
        if not same:
            raise FedloraError(f"client update {update.path}: its tensor file changed while aggregating")
        # An encoded update is decoded onto the reference (float32, in memory) and visited as any other; its
        # stored parts stay mapped, and their digests are checked after the decoded tensor's last use.
        self.arrays = self.stored if self.encoding == RAW else decode_update(self.stored, self.encoding, reference)

    @classmethod
    def of(cls, update: storage.ClientUpdate, expected: Mapping[str, tuple[str, tuple[int, ...]]],
           reference: Mapping[str, np.ndarray]) -> _Mapped | FedloraError:
        """The update mapped, or why it cannot be: mapped ahead of its turn, it is refused in its turn, so a round
        reports the first bad update first, as the screened path does."""
        try:
            return cls(update, expected, reference)
        except FedloraError as exc:
            return exc

    def visit(self, name: str, buffers: dict[Any, np.ndarray], measure: bool, add: tuple[Any, float, float] | None,
              check: bool) -> float | None:
        """One tensor: its squared distance from the reference if ``measure`` (returned), its weighted add if
        ``add`` = (sums, weight, clip), then, if ``check``, its digest."""
        from fedlora_cli.aggregation.arrays import squared_distance
        from fedlora_cli.storage.mapped import widen

        t = widen(self.arrays[name])
        squared = None
        if measure:
            squared = squared_distance(t, self.reference[name], buffers)
            if not math.isfinite(squared):
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
        from fedlora_cli.storage.encoding import parts_of

        for part in parts_of(name, self.encoding):
            storage.check_digest(self.stored[part], self.update.manifest.tensor_digests[part],
                                 f"{self._where}: tensor '{part}'")

    def _check_finite(self, name: str) -> None:
        """A tensor whose distance is not finite: refused as not matching its digest if it does not (a damaged
        file is that first), else for its NaN or Inf. (An infinite distance between finite tensors is possible
        only in float64, beyond 1e154, and is left to the norm bound.)"""
        import numpy as np

        from fedlora_cli.storage.mapped import widen

        self._check_digest(name)
        if not np.isfinite(widen(self.arrays[name])).all():
            raise FedloraError(f"client update {self.update.path}: tensor '{name}' holds NaN or Inf")



def _same_dtype(a: np.dtype, b: np.dtype) -> bool:
    """Equal dtypes, bfloat16 told apart from uint16 (numpy's equality ignores the tag)."""
    return a == b and a.metadata == b.metadata
