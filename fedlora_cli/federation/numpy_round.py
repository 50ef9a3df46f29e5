"""The coordinator's weighted mean over the client update files: numpy from the first byte read to the last byte
added (issue 17: a process that spends a second or more importing torch cannot aggregate at the speed of memory).

Every strategy's coordinator is numpy (:mod:`fedlora_cli.federation.server`); this module is how the ``mean``
(:class:`fedlora_cli.aggregation.Mean`, through :meth:`fedlora_cli.aggregation.Contributions.weighted_mean`,
also under a server optimiser) gets there in the fewest passes over the bytes, with every check the other
strategies' reading makes:

- the manifests and tensor headers are validated up front, by the same code (``read_updates``);
- each update's header is read again and must still be the one validated; its tensors are read one at a time
  as they are visited (not memory-mapped: a file truncated under a mapping kills the process with SIGBUS, a
  short read is one line); bfloat16 and float16 tensors are widened to float32 exactly
  (:func:`fedlora_cli.storage.mapped.widen`);
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

Memory: the global's tensors, the running sum, and one tensor name of each update of the group being averaged
(an int8 or bfloat16 update is held whole, decoded): flat in the number of clients.
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
            # The next group's headers are read and checked while this one is visited.
            following = [_Mapped.of(u, expected, reference) for u, _ in groups[i + 1]] if i + 1 < len(groups) else []
            squared = measured()
            if len(ready) < len(mapped):
                raise mapped[len(ready)]  # refused when its header was read, in its turn
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
            for m in ready:
                m.close()
            del mapped, ready
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
    """One client update, its tensors visited (measured, added, checked) by name, each read from the file as it
    is visited (an encoded update's parts read whole and decoded at once). Read, not memory-mapped: a file that
    another process truncates under a mapping kills the reader with SIGBUS (issue 28); a short read is one line."""

    def __init__(self, update: storage.ClientUpdate, expected: Mapping[str, tuple[str, tuple[int, ...]]],
                 reference: Mapping[str, np.ndarray]) -> None:
        from fedlora_cli.storage.encoding import RAW, decode_update, stored_header
        from fedlora_cli.storage.mapped import read_layout

        self.update, self.reference, self.encoding = update, reference, update.manifest.encoding
        self._where = f"client update tensors {update.tensors_path}"  # once: a path is slow to join and format
        self.layout = read_layout(update.tensors_path, "client update tensors")
        stored = stored_header(expected, self.encoding)
        same = set(self.layout.entries) == set(stored) and all(
            self.layout.entries[n][:2] == (dtype, tuple(shape)) for n, (dtype, shape) in stored.items()
        )
        if not same:
            raise FedloraError(f"client update {update.path}: its tensor file changed while aggregating")
        # An encoded update is decoded onto the reference (float32, in memory) and visited as any other; its
        # stored parts' digests are checked after the decoded tensor's last use.
        self.stored = None if self.encoding == RAW else self.layout.read_all("client update tensors")
        self.arrays = None if self.stored is None else decode_update(self.stored, self.encoding, reference)
        # Held open while the update is visited: one open per update, not per tensor.
        self._file = open(update.tensors_path, "rb") if self.stored is None else None  # noqa: SIM115

    def close(self) -> None:
        if getattr(self, "_file", None) is not None:
            self._file.close()

    __del__ = close  # an update left behind by a refused round closes its file too

    @classmethod
    def of(cls, update: storage.ClientUpdate, expected: Mapping[str, tuple[str, tuple[int, ...]]],
           reference: Mapping[str, np.ndarray]) -> _Mapped | FedloraError:
        """The update's header read and checked, or why it cannot be: read ahead of its turn, it is refused in its
        turn, so a round reports the first bad update first, as the screened path does."""
        try:
            return cls(update, expected, reference)
        except FedloraError as exc:
            return exc

    def visit(self, name: str, buffers: dict[Any, np.ndarray], measure: bool, add: tuple[Any, float, float] | None,
              check: bool) -> float | None:
        """One tensor: its squared distance from the reference if ``measure`` (returned), its weighted add if
        ``add`` = (sums, weight, clip), then, if ``check``, the digest of the very bytes used."""
        from fedlora_cli.aggregation.arrays import squared_distance
        from fedlora_cli.storage.mapped import widen

        stored = self._stored(name)
        t = widen(stored[name] if self.arrays is None else self.arrays[name])
        squared = None
        if measure:
            squared = squared_distance(t, self.reference[name], buffers)
            if not math.isfinite(squared):
                self._check_finite(name, stored, t)
        if add is not None:
            sums, weight, clip = add
            if clip == 1.0:
                sums.add(name, t, weight, buffers)
            else:
                sums.add_clipped(name, t, self.reference[name], clip, weight, buffers)
        if check:
            self._check_digest(name, stored)
        return squared

    def _stored(self, name: str) -> Mapping[str, np.ndarray]:
        """The stored parts of tensor ``name``: an encoded update's, held; a float32 update's tensor, read now."""
        if self.stored is not None:
            return self.stored
        t = self.layout.read(name, self._file.fileno())
        if t is None:
            raise FedloraError(f"{self._where} was cut short while aggregating (changed by another process)")
        return {name: t}

    def _check_digest(self, name: str, stored: Mapping[str, np.ndarray]) -> None:
        from fedlora_cli.storage.encoding import parts_of

        for part in parts_of(name, self.encoding):
            storage.check_digest(stored[part], self.update.manifest.tensor_digests[part],
                                 f"{self._where}: tensor '{part}'")

    def _check_finite(self, name: str, stored: Mapping[str, np.ndarray], t: np.ndarray) -> None:
        """A tensor whose distance is not finite: refused as not matching its digest if it does not (a damaged
        file is that first), else for its NaN or Inf. (An infinite distance between finite tensors is possible
        only in float64, beyond 1e154, and is left to the norm bound.)"""
        import numpy as np

        self._check_digest(name, stored)
        if not np.isfinite(t).all():
            raise FedloraError(f"client update {self.update.path}: tensor '{name}' holds NaN or Inf")
