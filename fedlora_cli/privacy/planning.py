"""Choosing a DP-SGD plan that can still learn: candidate (logical batch, steps per round) pairs for a budget.

Each DP-SGD step adds Gaussian noise of standard deviation sigma * C to the sum of the logical batch's clipped
per-example gradients, then divides by the expected batch B. The averaged clipped gradient has norm at most C;
the noise over the d trained coordinates has norm about sigma * C * sqrt(d) / B. Their ratio,

    noise-to-signal = sigma * sqrt(d) / B      (C cancels; the signal taken at its largest, C),

is what decides whether a step moves the model or only shakes it (Li et al., "Large Language Models Can Be
Strong Differentially Private Learners", ICLR 2022; Yu et al., "Differentially Private Fine-tuning of Language
Models", ICLR 2022). For a fixed budget and number of epochs, sigma grows roughly like sqrt(B), so the ratio
falls like 1 / sqrt(B): large logical batches, few epochs. FFA-LoRA trains about half the coordinates of
FedAvg-LoRA, so its ratio is about 1 / sqrt(2) of FedAvg-LoRA's at the same sigma and B.

The recommendation is the candidate with the lowest ratio among those that take at least
:data:`MIN_STEPS_PER_ROUND` steps a round (a round that barely moves wastes its share of the budget on
aggregation noise and drift) and at least one epoch over the whole federation. Candidates are screened with
the RDP accountant (fast; its sigma is at least the PRV accountant's); the recommended plan is calibrated again
with the accountant asked for.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from fedlora_cli.privacy.accounting import calibrate, epsilon as compose

BATCHES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
EPOCHS = (1, 2, 3)
MIN_STEPS_PER_ROUND = 3
SCREENING_ACCOUNTANT = "rdp"


@dataclass(frozen=True)
class Candidate:
    batch: int  # expected logical batch (Poisson sampling at q = batch / n)
    steps_per_round: int
    epochs: float  # passes over the client's n examples in the whole federation
    sample_rate: float
    noise_multiplier: float
    noise_to_signal: float  # sigma * sqrt(d) / batch
    accountant: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def candidates(
    examples: int, target_epsilon: float, delta: float, rounds: int, coordinates: int,
    batches: Sequence[int] = BATCHES, epochs: Sequence[float] = EPOCHS,
    progress: Callable[[int, int], None] | None = None,
) -> list[Candidate]:
    """Every (batch, epochs) pair that fits the client's ``examples``, calibrated to the budget."""
    pairs = [(b, e) for b in batches if b <= examples // 2 for e in epochs]
    result = []
    for i, (batch, epochs_wanted) in enumerate(pairs, start=1):
        steps = max(1, math.ceil(epochs_wanted * examples / (batch * rounds)))
        result.append(_candidate(examples, target_epsilon, delta, rounds, coordinates, batch, steps,
                                 SCREENING_ACCOUNTANT))
        if progress is not None:
            progress(i, len(pairs))
    return result


def _candidate(examples: int, target_epsilon: float, delta: float, rounds: int, coordinates: int, batch: int,
               steps: int, accountant: str) -> Candidate:
    q = min(1.0, batch / examples)
    sigma = calibrate(target_epsilon, delta, q, steps * rounds, accountant)
    return Candidate(batch, steps, steps * rounds * batch / examples, q, sigma,
                     sigma * math.sqrt(coordinates) / batch, accountant)


def recommend(found: Sequence[Candidate], examples: int, target_epsilon: float, delta: float, rounds: int,
              coordinates: int, accountant: str) -> Candidate | None:
    """The lowest noise-to-signal candidate that trains enough (see the module docstring), calibrated with
    ``accountant``; None if no candidate qualifies."""
    usable = [c for c in found if c.steps_per_round >= MIN_STEPS_PER_ROUND and c.epochs >= 1]
    if not usable:
        return None
    best = min(usable, key=lambda c: (c.noise_to_signal, c.epochs))
    if accountant == best.accountant:
        return best
    return _candidate(examples, target_epsilon, delta, rounds, coordinates, best.batch, best.steps_per_round,
                      accountant)


def spent(candidate: Candidate, rounds: int, delta: float) -> float:
    """The epsilon the candidate's plan spends over ``rounds``, by its own accountant (the check of a plan)."""
    return compose([(candidate.noise_multiplier, candidate.sample_rate, candidate.steps_per_round * rounds)], delta,
                   candidate.accountant)
