"""DP-FedAvg at the coordinator (McMahan et al., "Learning Differentially Private Recurrent Language Models",
ICLR 2018): clip each client's update (its difference from the current global) to norm C, average with equal
weights, add Gaussian noise of standard deviation sigma * C / m for m clients.

:class:`DPFedAvg` is a wrapper strategy, as in Flower: it checks the budget, clips, delegates the average to the
strategy it wraps (which must be linear: ``mean``), adds the noise, and commits the release to the
coordinator's ledger (:mod:`.ledgers`) just before the new global checkpoint is written, so a round aggregated
twice counts as two releases. Each global checkpoint's manifest also carries the releases made up to it.
Accounting composes the releases exactly as Gaussian releases with every client in every one
(:func:`.accounting.server_epsilon`): a round's sample of clients is public (seeded by the recipe, recorded in
the manifest), so no amplification by sampling is claimed, although the ledger records the rate q it asked at.

All of it is numpy: the deltas are clipped in float32, the noise is drawn from numpy's ``Generator`` (PCG64)
seeded with the round's noise seed (by default 63 bits from the OS's secure source, :func:`secrets.randbits`), as
float32 normals, one tensor name at a time in name order. A given seed reproduces the round.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from fedlora_cli import aggregation
from fedlora_cli.aggregation.strategy import Aggregate, Contributions, PrivacyRelease, RoundSpec, Strategy
from fedlora_cli.errors import FedloraError
from fedlora_cli.privacy.accounting import server_epsilon
from fedlora_cli.privacy.ledgers import ServerLedger, write_server_ledger

if TYPE_CHECKING:
    from fedlora_cli.recipe import ServerPrivacySection


@dataclass
class _Delta:
    """A clipped delta as the wrapped strategy receives it."""

    tensors: Mapping[str, np.ndarray] | None
    weight: float
    client_id: str = "delta"

    def get(self, name: str) -> np.ndarray:
        raise FedloraError("DP-FedAvg wraps only strategies that stream (linear ones)")


@dataclass(kw_only=True)
class DPFedAvg(Strategy):
    """DP-FedAvg around ``inner``, releasing into ``ledger``. Keyword-only: its counts and rates sit side by side.

    ``num_clients`` is the fixed denominator m: the expected number of clients a round asks (q N, all N when the
    federation does not sample). ``sample_rate`` is q, the Poisson rate at which each of the ``population``
    clients is asked (1: all of them), which the ledger records (the accountant takes the sample as public).
    """

    inner: Strategy
    settings: ServerPrivacySection
    ledger: ServerLedger
    num_clients: int
    seed: int
    release: dict[str, Any]  # what the ledger records of this release beside (sigma, q, steps)
    sample_rate: float = 1.0
    population: int | None = None  # default: num_clients
    # Secure aggregation: each site clipped its own difference and the one contribution is their sum, so it is
    # not clipped again (the server cannot clip what it cannot see); noise and denominator m are unchanged.
    clipped_at_sites: bool = False
    history: list[list[float]] = field(init=False)
    epsilon: float = field(init=False, default=0.0)

    name = "dp-fedavg"

    def __post_init__(self) -> None:
        self.population = self.population or self.num_clients
        self.history = [*self.ledger.history(), [self.settings.noise_multiplier, self.sample_rate, 1]]

    def check_count(self, clients: int, label: str) -> None:
        self.inner.check_count(clients, label)

    def check_round(self, clients: int) -> None:
        """Refuse a release over the budget, or more updates than the noise is calibrated for; before any work."""
        sp = self.settings
        self.epsilon = server_epsilon([tuple(e) for e in self.history], sp.delta)
        if sp.target_epsilon is not None and self.epsilon > sp.target_epsilon:
            raise FedloraError(
                f"server privacy budget: this release would bring client-level epsilon to {self.epsilon:.3f} "
                f"({len(self.history)} releases in {self.ledger.path}), over server_privacy.target_epsilon "
                f"{sp.target_epsilon:g}; nothing written"
            )
        # The fixed denominator m of DP-FedAvg (the expected number of clients, not the number of updates that
        # arrived), so that adding or removing one client moves the average by at most C / m.
        if clients > self.population:
            raise FedloraError(
                f"DP-FedAvg: {clients} client updates for a federation of federation.clients = {self.population}; "
                f"the noise is calibrated for at most {self.population}"
            )

    def aggregate(self, contributions: Contributions, spec: RoundSpec) -> Aggregate:
        def average(deltas: Iterable[tuple[dict[str, np.ndarray], float]]) -> dict[str, np.ndarray]:
            inner = Contributions((_Delta(d, w), True) for d, w in deltas)
            return self.inner.aggregate(inner, spec).tensors

        updates = ((c.tensors, c.weight) for c in contributions)
        sp = self.settings
        return Aggregate(dp_fedavg(updates, spec.reference, sp.clip_norm, sp.noise_multiplier, self.num_clients,
                                   self.seed, average, clipped_at_sites=self.clipped_at_sites))

    def commit(self) -> None:
        # Ledger first: if writing the checkpoint fails after this, the release is over-counted, never forgotten.
        sp = self.settings
        self.ledger.releases.append({"noise_multiplier": sp.noise_multiplier, "sample_rate": self.sample_rate, "steps": 1,
                                     "delta": sp.delta, **self.release, "created": time.time()})
        write_server_ledger(self.ledger)

    @property
    def privacy(self) -> PrivacyRelease:
        return PrivacyRelease(self.history, self.settings.delta, self.epsilon, self.ledger.path)

    def describe(self) -> dict[str, object]:
        return {"strategy": self.name}


def dp_fedavg(
    updates: Iterable[tuple[aggregation.Tensors, float]],
    reference: aggregation.Tensors,
    clip: float,
    noise_multiplier: float,
    num_clients: int,
    seed: int,
    average: Callable[[Iterable[tuple[dict[str, np.ndarray], float]]], dict[str, np.ndarray]] | None = None,
    *,
    clipped_at_sites: bool = False,
) -> dict[str, np.ndarray]:
    """DP-FedAvg around :func:`aggregation.weighted_mean`: clip each update's delta, average equally, add noise.

    The client weights in ``updates`` are ignored: DP-FedAvg's sensitivity bound C / m needs equal weights.
    ``num_clients`` is the fixed denominator m (the federation's size); when fewer updates arrive, their sum is
    still divided by m, which keeps the sensitivity at C / m. ``average`` (default
    :func:`aggregation.weighted_mean`) sums the weighted clipped deltas: the wrapped strategy's linear mean.
    ``clipped_at_sites``: the updates' deltas were clipped where they were made (secure aggregation, where one
    update is the sum of the sites' clipped deltas) and are taken as they are.
    """

    def clipped_deltas() -> Iterator[tuple[dict[str, np.ndarray], float]]:
        for tensors, _ in updates:
            if clipped_at_sites:
                yield {n: np.subtract(t, reference[n], dtype=np.float32) for n, t in tensors.items()}, 1.0 / num_clients
            else:
                yield aggregation.clipped_delta(tensors, reference, clip), 1.0 / num_clients

    # The mean is taken over the deltas, so that with fewer than m updates the reference is not shrunk with them.
    deltas = clipped_deltas()
    first = next(deltas, None)
    if first is None:  # a sample that asked nobody: the release is the noise alone, counted like any other
        mean_delta = {name: np.zeros(ref.shape, np.float32) for name, ref in reference.items()}
    else:
        mean_delta = (average or aggregation.weighted_mean)(itertools.chain([first], deltas))
    generator = np.random.default_rng(seed)
    std = np.float32(noise_multiplier * clip / num_clients)
    result = {}
    for name, d in sorted(mean_delta.items()):
        if noise_multiplier != 0:
            d = d + generator.standard_normal(d.shape, dtype=np.float32) * std
        ref = reference[name]
        # In float32 (float64 references too), then back to the reference's dtype, as the delta was taken.
        result[name] = (ref.astype(np.float32) + d).astype(aggregation.accumulator_dtype(ref.dtype))
    return result
