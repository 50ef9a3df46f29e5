"""What every aggregation strategy shares: the interface, what it receives, and what it returns.

A strategy is a small object (after Flower's strategies) with one job: turn the accepted client updates of a
round into the new values of the sent tensors. It does no I/O of its own: the coordinator
(:mod:`fedlora_cli.federation.server`) reads, validates and screens the updates and hands them over as
:class:`Contributions`, which stream one client update at a time; a strategy that needs every client's value of
a tensor at once reads it back by name (:meth:`Contribution.get`). Wrappers compose: DP-FedAvg
(:class:`fedlora_cli.privacy.dp_fedavg.DPFedAvg`) wraps a strategy; the norm bound
(:mod:`.norm_bound`) screens updates in front of any strategy.

A new strategy is one new class with a ``name``, registered in :data:`fedlora_cli.aggregation.STRATEGIES`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np

from fedlora_cli.aggregation.functions import LayerReport, weighted_mean

if TYPE_CHECKING:
    from fedlora_cli.adapters.kinds import AdapterKind


class Contribution(Protocol):
    """One accepted client update, as a strategy sees it."""

    client_id: str
    weight: float  # p_k, normalised over every update of the round (before any was rejected)
    # The whole update while it is the one being streamed (float32 or float64 arrays: bfloat16 and float16 are
    # widened exactly); None once the strategy has moved on to the next.
    tensors: Mapping[str, np.ndarray] | None

    def get(self, name: str) -> np.ndarray:
        """One tensor of this update, read again (and checked again) on demand."""
        ...


class Contributions:
    """The accepted client updates of a round, iterated once, one update in memory at a time.

    ``items`` yields each update with whether the screen in front of the strategy accepted it; ``accepted`` and
    ``rejected`` fill in as the iteration goes. A rejected update is never handed to the strategy.
    """

    def __init__(self, items: Iterable[tuple[Contribution, bool]]) -> None:
        self._items = items
        self.accepted: list[Contribution] = []
        self.rejected: list[Contribution] = []

    def __iter__(self) -> Iterator[Contribution]:
        for contribution, accepted in self._items:
            if not accepted:
                self.rejected.append(contribution)
                continue
            self.accepted.append(contribution)
            yield contribution
            contribution.tensors = None  # at most the update being aggregated (and the next, being read) in memory

    def weighted_mean(self) -> dict[str, np.ndarray]:
        """sum_k p_k T_k over the accepted updates (:func:`.functions.weighted_mean`), streamed, renormalised over
        their weights when the screen rejected some. The coordinator's own contributions do this in one pass over
        the mapped files (:mod:`fedlora_cli.federation.numpy_round`), with the same bits."""
        averaged = weighted_mean((c.tensors, c.weight) for c in self)
        if self.rejected:
            kept = sum(c.weight for c in self.accepted)
            for t in averaged.values():
                np.divide(t, t.dtype.type(kept), out=t)
        return averaged

    def drain(self) -> list[Contribution]:
        """Screen every update (one at a time) without aggregating; the accepted ones, to be read back by name."""
        for _ in self:
            pass
        return self.accepted


@dataclass(frozen=True)
class RoundSpec:
    """What a strategy knows about the round besides the updates."""

    sent: list[str]  # the names of the tensors clients send, sorted
    kind: AdapterKind
    alpha: float
    rank: int  # the global adapter's rank
    rank_for: Callable[[str], int]  # a client's LoRA rank
    # The global's values of the sent tensors (what a global-rank client received), widened as the updates are.
    reference: Mapping[str, np.ndarray]


@dataclass
class Aggregate:
    """What a strategy produced: the new sent tensors, and what it reports."""

    tensors: dict[str, np.ndarray]
    # Per adapted layer, how far plain averaging of A and B is from the exact mean of the products (svd, exact).
    layers: dict[str, LayerReport] = field(default_factory=dict)
    # Per adapted layer, a dense residual to fold into the base weights (exact).
    residuals: dict[str, np.ndarray] = field(default_factory=dict)
    # A server optimiser's state after the round (its moments), kept in the global checkpoint.
    server_state: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class PrivacyRelease:
    """What a round under client-level DP releases: the accountant's history after it and the guarantee."""

    history: list[list[float]]  # [noise multiplier, sample rate, steps] per release, this one included
    delta: float
    epsilon: float
    ledger: Path  # the coordinator's ledger the release is recorded in


class Strategy:
    """The interface. Class attributes say what the strategy needs, so the recipe can be validated up front."""

    name: ClassVar[str]
    # Combines the products B_k A_k: every client must send both factors of a kind that has them.
    needs_factors: ClassVar[bool] = False
    # Combines clients of different LoRA ranks (adapter.client_ranks).
    mixes_ranks: ClassVar[bool] = False
    # Linear in the updates with the given weights: what DP-FedAvg's sensitivity bound needs of a strategy it wraps,
    # and what secure aggregation needs (the coordinator sees only the weighted sum of the updates).
    linear: ClassVar[bool] = False
    # What a non-linear strategy needs of each update beyond their sum (said when a rule that needs a linear
    # strategy refuses it).
    needs_each: ClassVar[str] = "each update on its own"
    # Its aggregate is the next value of each sent tensor, so aggregate - global is a pseudo-gradient a server
    # optimiser can step along (not so for svd, which re-factorises, or exact, which moves the base weights).
    optimisable: ClassVar[bool] = True

    @classmethod
    def from_recipe(cls, federation: Any) -> Strategy:
        """The strategy with its settings from a recipe's federation section."""
        return cls()

    def check_count(self, clients: int, label: str) -> None:
        """Refuse a number of client updates this strategy cannot combine; ``label`` names the setting."""

    def check_round(self, clients: int) -> None:
        """Refuse the round before any client update is read in full (DP-FedAvg: its budget)."""

    def aggregate(self, contributions: Contributions, spec: RoundSpec) -> Aggregate:
        raise NotImplementedError

    @property
    def privacy(self) -> PrivacyRelease | None:
        """The client-level DP release this round makes, if the strategy adds noise for one."""
        return None

    def commit(self) -> None:
        """Record what this round released, just before the new global checkpoint is written (DP-FedAvg)."""

    def describe(self) -> dict[str, object]:
        """What the global manifest records of how this round aggregated (beyond the norm bound)."""
        return {"strategy": self.name}


def normalised(contributions: Iterable[Contribution]) -> list[float]:
    """The contributions' weights renormalised to sum to one."""
    items = list(contributions)
    total = sum(c.weight for c in items)
    return [c.weight / total for c in items]
