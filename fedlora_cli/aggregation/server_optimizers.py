"""Server optimisers: the coordinator steps along the round's pseudo-gradient instead of taking the aggregate.

With x the global's value of a sent tensor and Delta = aggregate - x (the pseudo-gradient: the negated mean
client update, Reddi et al. Algorithm 2)::

    fedavgm     v = beta v + Delta;                                   x += eta v      (Hsu et al. 2019)
    fedadagrad  m = b1 m + (1 - b1) Delta;  v = v + Delta^2;          x += eta m / (sqrt(v) + tau)
    fedyogi     m likewise;  v = v - (1 - b2) Delta^2 sign(v - Delta^2);   x likewise
    fedadam     m likewise;  v = b2 v + (1 - b2) Delta^2;             x likewise

(Reddi et al., "Adaptive Federated Optimization", ICLR 2021: no bias correction, v starts at tau^2.) Each is a
wrapper around the round's strategy, as DP-FedAvg is: under DP-FedAvg the noise is in the aggregate before the
optimiser sees it, so the step is post-processing. It acts only on the tensors the method sends (FFA's A and a
kept B never move), and its state (m, v) lives in the global checkpoint (``server_state.safetensors``), so a
resumed or hand-run federation continues exactly. Moments are kept in float32 (float64 for float64 tensors);
the arithmetic is numpy's, in that dtype.
With fedavgm, beta 0 and eta 1 it is plain FedAvg.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from fedlora_cli.aggregation.functions import accumulator_dtype
from fedlora_cli.aggregation.strategy import Aggregate, Contributions, PrivacyRelease, RoundSpec, Strategy

MOMENTUM, VARIANCE = "momentum", "variance"


def state_name(slot: str, tensor: str) -> str:
    """The name of one optimiser slot of one tensor in ``server_state.safetensors``."""
    return f"{slot}:{tensor}"


@dataclass(kw_only=True)
class ServerOptimizer(Strategy):
    """A server optimiser around ``inner`` (the round's strategy), continuing from ``state``. Keyword-only: its
    four settings are floats side by side."""

    inner: Strategy
    lr: float
    beta1: float
    beta2: float
    tau: float
    state: Mapping[str, np.ndarray] = field(default_factory=dict)  # the previous round's, by state_name

    default_lr: ClassVar[float] = 0.01
    slots: ClassVar[tuple[str, ...]] = (MOMENTUM, VARIANCE)

    @classmethod
    def around(cls, inner: Strategy, federation: Any, state: Mapping[str, np.ndarray]) -> ServerOptimizer:
        lr = federation.server_lr if federation.server_lr is not None else cls.default_lr
        return cls(inner=inner, lr=lr, beta1=federation.server_momentum, beta2=federation.server_beta2,
                   tau=federation.server_tau, state=state)

    def check_count(self, clients: int, label: str) -> None:
        self.inner.check_count(clients, label)

    def check_round(self, clients: int) -> None:
        self.inner.check_round(clients)

    def aggregate(self, contributions: Contributions, spec: RoundSpec) -> Aggregate:
        result = self.inner.aggregate(contributions, spec)
        state: dict[str, np.ndarray] = {}
        stepped = {}
        for name, t in result.tensors.items():
            x = spec.reference[name]
            work = accumulator_dtype(x.dtype)
            x = x.astype(work, copy=False)
            delta = t.astype(work, copy=False) - x
            slots = {slot: self._slot(slot, name, delta) for slot in self.slots}
            stepped[name] = x + self.step(delta, slots)
            state.update({state_name(slot, name): value for slot, value in slots.items()})
        return Aggregate(stepped, result.layers, result.residuals, state)

    def _slot(self, slot: str, name: str, like: np.ndarray) -> np.ndarray:
        previous = self.state.get(state_name(slot, name))
        if previous is not None:
            return previous.astype(like.dtype)  # a copy: the previous round's state is never written through
        start = self.tau**2 if slot == VARIANCE else 0.0
        return np.full_like(like, start)

    def step(self, delta: np.ndarray, slots: dict[str, np.ndarray]) -> np.ndarray:
        """Update ``slots`` in place from ``delta``; return the step added to the global."""
        m = slots[MOMENTUM]
        m *= m.dtype.type(self.beta1)
        m += m.dtype.type(1 - self.beta1) * delta
        v = self.second_moment(slots[VARIANCE], delta * delta)
        return m.dtype.type(self.lr) * m / (np.sqrt(v) + m.dtype.type(self.tau))

    def second_moment(self, v: np.ndarray, squared: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def commit(self) -> None:
        self.inner.commit()

    @property
    def privacy(self) -> PrivacyRelease | None:
        return self.inner.privacy

    def describe(self) -> dict[str, object]:
        return {**self.inner.describe(), "server_optimizer": self.optimizer_name, "server_lr": self.lr,
                **self.settings()}

    def settings(self) -> dict[str, float]:
        return {"server_beta1": self.beta1, "server_beta2": self.beta2, "server_tau": self.tau}

    optimizer_name: ClassVar[str]


class FedAvgM(ServerOptimizer):
    """Server momentum (Hsu et al., "Measuring the Effects of Non-Identical Data Distribution", 2019)."""

    optimizer_name = "fedavgm"
    default_lr = 1.0
    slots = (MOMENTUM,)

    def step(self, delta: np.ndarray, slots: dict[str, np.ndarray]) -> np.ndarray:
        m = slots[MOMENTUM]
        m *= m.dtype.type(self.beta1)
        m += delta
        return m.dtype.type(self.lr) * m

    def settings(self) -> dict[str, float]:
        return {"server_momentum": self.beta1}


class FedAdagrad(ServerOptimizer):
    optimizer_name = "fedadagrad"

    def second_moment(self, v: np.ndarray, squared: np.ndarray) -> np.ndarray:
        v += squared
        return v

    def settings(self) -> dict[str, float]:
        return {"server_beta1": self.beta1, "server_tau": self.tau}


class FedYogi(ServerOptimizer):
    optimizer_name = "fedyogi"

    def second_moment(self, v: np.ndarray, squared: np.ndarray) -> np.ndarray:
        v -= v.dtype.type(1 - self.beta2) * squared * np.sign(v - squared)
        return v


class FedAdam(ServerOptimizer):
    optimizer_name = "fedadam"

    def second_moment(self, v: np.ndarray, squared: np.ndarray) -> np.ndarray:
        v *= v.dtype.type(self.beta2)
        v += v.dtype.type(1 - self.beta2) * squared
        return v


SERVER_OPTIMIZERS: dict[str, type[ServerOptimizer]] = {
    cls.optimizer_name: cls for cls in (FedAvgM, FedAdam, FedYogi, FedAdagrad)
}
