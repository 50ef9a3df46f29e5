"""Privacy accounting: epsilon for what actually ran, noise calibration, and each client's ledger.

Client level, sample-level DP-SGD (Abadi et al. 2016, with Opacus): every step samples each example of the
client's shard independently with rate q = batch_size / n (Poisson sampling), clips each example's gradient
to norm C (``privacy.max_grad_norm``) and adds Gaussian noise of standard deviation sigma * C. As in the
FFA-LoRA experiments, sigma is calibrated once for the whole planned federation (local steps x rounds), with
the PRV accountant by default. Under ``privacy.calibration: federation`` (the default) it is calibrated at init
for the client that needs the most noise (the smallest) and written into the round-0 global checkpoint's recipe,
so every client uses the same sigma; under ``client`` each client calibrates its own from its own dataset size
when it trains (the same function, one plan), so larger clients add less noise and the coordinator needs no
client's size. What each round actually ran is appended to the client's *privacy ledger*
(``[sigma, q, steps]`` entries kept in its client state), and the epsilon fedlora reports is the accountant's
epsilon for the whole ledger: it accumulates across rounds and processes, and a round that would exceed the
budget is refused before it starts.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedlora_cli.errors import FedloraError
from fedlora_cli.privacy.opacus_import import load

if TYPE_CHECKING:
    from fedlora_cli.recipe.schema import PrivacySection


# One ledger entry: (noise multiplier, sample rate, steps), the form Opacus accountants keep as history.
Entry = tuple[float, float, int]


# Exact composition of Gaussian releases without sampling (q = 1 throughout): what DP-FedAvg spends when every
# client takes part in every round. Not a recipe choice (DP-SGD always samples); see :func:`server_epsilon`.
GAUSSIAN = "gaussian"


def epsilon(history: Sequence[Entry], delta: float, accountant: str = "prv") -> float:
    """The accountant's epsilon for everything in ``history`` at ``delta``; 0 for an empty history."""
    steps = [(float(s), float(q), int(n)) for s, q, n in history if n > 0]
    if not steps:
        return 0.0
    if any(s == 0 for s, _, _ in steps):
        return math.inf
    if accountant == GAUSSIAN:
        if any(q != 1.0 for _, q, _ in steps):
            raise ValueError("the exact Gaussian composition covers releases without sampling (q = 1) only")
        try:
            mu = math.sqrt(sum(n / s**2 for s, _, n in steps))
        except (ZeroDivisionError, OverflowError):  # s**2 underflowed to 0 (a sigma of 1e-300) or overflowed (1e300)
            mu = math.sqrt(sum(n / s / s for s, _, n in steps))
        return math.inf if math.isinf(mu) else gaussian_epsilon(mu, delta)
    # Imports torch: not for the exact Gaussian (the coordinator).
    acc = load("opacus.accountants").create_accountant(mechanism=accountant)
    acc.history = steps
    with _quiet_accountant():
        return float(acc.get_epsilon(delta=delta))


# The accountant of DP-FedAvg's client-level epsilon (see :func:`server_accounted`).
SERVER_ACCOUNTANT = GAUSSIAN


def server_accounted(history: Sequence[Entry]) -> list[Entry]:
    """DP-FedAvg's releases, each (sigma, q, count), as they are accounted: with every client in every release
    (q taken as 1).

    A round's sample of clients is drawn from the recipe's seed and recorded in the global checkpoint's manifest:
    it is public, so amplification by sampling, which needs a secret sample, is not claimed. A client that was
    not asked counts as a zero update in a release of fixed denominator, which this bound covers.
    """
    return [(float(s), 1.0, int(n)) for s, _, n in history]


def server_epsilon(history: Sequence[Entry], delta: float) -> float:
    """DP-FedAvg's client-level epsilon for its releases: the exact composition of :func:`server_accounted`."""
    return epsilon(server_accounted(history), delta, SERVER_ACCOUNTANT)


def gaussian_epsilon(mu: float, delta: float) -> float:
    """The exact epsilon at ``delta`` of a Gaussian mechanism of sensitivity 1 and noise 1 / ``mu``.

    T releases of noise multipliers sigma_i compose exactly into one Gaussian with mu = sqrt(sum 1 / sigma_i^2)
    (Dong, Roth and Su, "Gaussian Differential Privacy", 2019), whose tight curve is the analytic Gaussian
    mechanism's (Balle and Wang, ICML 2018): delta(eps) = Phi(mu/2 - eps/mu) - e^eps Phi(-mu/2 - eps/mu).
    RDP bounds the same releases loosely (sigma 1, T 10, delta 1e-5: 19.05 against this 17.86). The smallest
    eps with delta(eps) <= delta is found by bisection and rounded up, so the figure never understates.
    """
    from scipy.special import log_ndtr

    if mu <= 0:
        return 0.0

    def delta_at(eps: float) -> float:
        try:
            return math.exp(log_ndtr(mu / 2 - eps / mu)) - math.exp(eps + log_ndtr(-mu / 2 - eps / mu))
        except OverflowError:  # the subtracted term past 1e308 (a probe far above the answer, mu in the thousands+)
            return -math.inf

    if delta_at(0.0) <= delta:
        return 0.0
    low, high = 0.0, 1.0
    while delta_at(high) > delta:
        low, high = high, 2 * high
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (middle, high) if delta_at(middle) > delta else (low, middle)
    return high


@contextlib.contextmanager
def _quiet_accountant() -> Iterator[None]:
    """Silences Opacus' note that the best RDP order is the largest it tried: the epsilon is then still a valid
    upper bound, only possibly a loose one (and the PRV accountant uses RDP only to size its domain)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        yield


@functools.lru_cache(maxsize=256)  # a pure function of its arguments, and a few seconds each for PRV
def calibrate(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "prv") -> float:
    """The smallest noise multiplier whose epsilon after ``steps`` steps at ``sample_rate`` is at most the target."""
    get_noise_multiplier = load("opacus.accountants.utils").get_noise_multiplier

    if not 0 < sample_rate <= 1:
        raise FedloraError(f"sample rate {sample_rate:.4g} must lie in (0, 1]: the batch is larger than the data")
    with _quiet_accountant():
        try:
            return float(
                get_noise_multiplier(
                    target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate, steps=steps,
                    accountant=accountant, epsilon_tolerance=0.005,
                )
            )
        except ValueError as exc:
            raise FedloraError(f"cannot reach epsilon {target_epsilon} with this plan: {exc}") from None


def check_delta(delta: float, client_examples: int, who: str) -> None:
    if delta >= 1.0 / client_examples:
        raise FedloraError(
            f"privacy.delta {delta:g} must be smaller than 1/n = {1.0 / client_examples:.3g} for {who} "
            f"({client_examples} examples): a larger delta allows leaking whole examples"
        )


@dataclass
class ClientPlan:
    examples: int
    sample_rate: float
    steps_per_round: int


def client_plan(examples: int, batch_size: int, local_steps: int | None, local_epochs: float | None) -> ClientPlan:
    """Poisson sample rate and steps per round for a client with ``examples`` examples (the steps training runs)."""
    from fedlora_cli.data.examples import steps_for

    q = min(1.0, batch_size / examples)
    return ClientPlan(examples, q, steps_for(examples, batch_size, local_steps, local_epochs))


# Calibrate a hair under the budget, so that the ledger, composed round by round, stays within it.
CALIBRATION_MARGIN = 0.005


def calibrate_noise(privacy: PrivacySection, plans: Sequence[ClientPlan], rounds: int) -> float:
    """The noise multiplier that keeps every one of ``plans`` within ``privacy.target_epsilon`` over ``rounds``
    rounds (all the clients' plans under 'federation' calibration: the largest any of them needs; the one training
    client's under 'client'): calibrated :data:`CALIBRATION_MARGIN` under the budget and rounded up to 1e-6, never
    down (a smaller sigma than calibrated would spend more than the budget)."""
    assert privacy.target_epsilon is not None
    target = privacy.target_epsilon * (1 - CALIBRATION_MARGIN)
    for k, p in enumerate(plans):
        check_delta(privacy.delta, p.examples, f"client {k}")
    sigma = max(calibrate(target, privacy.delta, p.sample_rate, p.steps_per_round * rounds, privacy.accountant)
                for p in plans)
    return math.ceil(sigma * 1e6) / 1e6


@dataclass
class Ledger:
    """A client's privacy spending: every (sigma, q, steps) it ran, in order."""

    accountant: str
    delta: float
    budget: float | None
    history: list[Entry]

    def epsilon(self, extra: Sequence[Entry] = ()) -> float:
        return epsilon([*self.history, *extra], self.delta, self.accountant)

    def to_dict(self) -> dict[str, Any]:
        spent = self.epsilon()
        return {
            "accountant": self.accountant,
            "delta": self.delta,
            "budget": self.budget,
            "epsilon": spent,
            "remaining": None if self.budget is None else max(0.0, self.budget - spent),
            "history": [list(e) for e in self.history],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Ledger:
        try:
            history = [(float(s), float(q), int(n)) for s, q, n in data["history"]]
            return cls(str(data["accountant"]), float(data["delta"]), data.get("budget"), history)
        except (KeyError, TypeError, ValueError):
            raise FedloraError("privacy ledger is malformed") from None
