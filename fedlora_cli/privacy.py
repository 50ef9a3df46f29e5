"""Differential privacy: DP-SGD at each client, DP-FedAvg at the server, and exact accounting across rounds.

Client level, sample-level DP-SGD (Abadi et al. 2016, with Opacus): every step samples each example of the
client's shard independently with rate q = batch_size / n (Poisson sampling), clips each example's gradient
to norm C (``privacy.max_grad_norm``) and adds Gaussian noise of standard deviation sigma * C. As in the
FFA-LoRA experiments, sigma is calibrated once for the whole planned federation (local steps x rounds), with
the PRV accountant by default, and written into the round-0 global checkpoint's recipe so every client uses
the same sigma. What each round actually ran is appended to the client's *privacy ledger*
(``[sigma, q, steps]`` entries kept in its client state), and the epsilon fedlora reports is the accountant's
epsilon for the whole ledger: it accumulates across rounds and processes, and a round that would exceed the
budget is refused before it starts.

Server level, DP-FedAvg (McMahan et al. 2018): the coordinator clips each client's update (its difference
from the current global) to norm C, averages with equal weights, and adds Gaussian noise of standard
deviation sigma * C / m for m clients. It wraps :func:`fedlora_cli.aggregation.weighted_mean` instead of
copying it. Its ledger is the coordinator's (``checkpoint.ServerLedger``, one file per federation beside the
global checkpoints), which counts a round aggregated twice as two releases; each global checkpoint's manifest
also carries the releases made up to it.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedlora_cli import aggregation
from fedlora_cli.errors import FedloraError

if TYPE_CHECKING:
    import torch

    from fedlora_cli.recipe import PrivacySection

# One ledger entry: (noise multiplier, sample rate, steps), the form Opacus accountants keep as history.
Entry = tuple[float, float, int]


def epsilon(history: Sequence[Entry], delta: float, accountant: str = "prv") -> float:
    """The accountant's epsilon for everything in ``history`` at ``delta``; 0 for an empty history."""
    from opacus.accountants import create_accountant

    steps = [(float(s), float(q), int(n)) for s, q, n in history if n > 0]
    if not steps:
        return 0.0
    if any(s == 0 for s, _, _ in steps):
        return math.inf
    acc = create_accountant(mechanism=accountant)
    acc.history = steps
    with _quiet_accountant():
        return float(acc.get_epsilon(delta=delta))


@contextlib.contextmanager
def _quiet_accountant() -> Iterator[None]:
    """Silences Opacus' note that the best RDP order is the largest it tried: the epsilon is then still a valid
    upper bound, only possibly a loose one (and the PRV accountant uses RDP only to size its domain)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        yield


def calibrate(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "prv") -> float:
    """The smallest noise multiplier whose epsilon after ``steps`` steps at ``sample_rate`` is at most the target."""
    from opacus.accountants.utils import get_noise_multiplier

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
    from fedlora_cli.data import steps_for

    q = min(1.0, batch_size / examples)
    return ClientPlan(examples, q, steps_for(examples, batch_size, local_steps, local_epochs))


def calibrate_federation(privacy: PrivacySection, plans: Sequence[ClientPlan], rounds: int) -> float:
    """One sigma for every client: the largest any client needs to stay within the budget over all rounds."""
    assert privacy.target_epsilon is not None
    for k, p in enumerate(plans):
        check_delta(privacy.delta, p.examples, f"client {k}")
    return max(
        calibrate(privacy.target_epsilon, privacy.delta, p.sample_rate, p.steps_per_round * rounds, privacy.accountant)
        for p in plans
    )


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


# --------------------------------------------------------------------------------------------------------
# DP-SGD at a client


class DPSGD:
    """Opacus' per-example gradients and noisy clipped optimizer around a model, removable after a round."""

    def __init__(self, model: Any, optimizer: Any, noise_multiplier: float, max_grad_norm: float, expected_batch: int,
                 seed: int) -> None:
        import torch
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        # Opacus records activations only in train mode; a model fresh from from_pretrained is in eval mode
        # and would fail with "No activations detected".
        model.train()
        self.module = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=True)
        generator = torch.Generator().manual_seed(seed)
        self.optimizer = DPOptimizer(
            optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch, loss_reduction="mean", generator=generator,
        )

    def close(self) -> None:
        self.module._close()


def poisson_batches(n: int, sample_rate: float, steps: int, rng: Any) -> Iterator[Any]:
    """Each step includes every example independently with probability ``sample_rate``."""
    import numpy as np

    for _ in range(steps):
        yield np.flatnonzero(rng.random(n) < sample_rate)


# --------------------------------------------------------------------------------------------------------
# DP-FedAvg at the server


def dp_fedavg(
    updates: Iterable[tuple[aggregation.Tensors, float]],
    reference: aggregation.Tensors,
    clip: float,
    noise_multiplier: float,
    num_clients: int,
    seed: int,
) -> dict[str, torch.Tensor]:
    """DP-FedAvg around :func:`aggregation.weighted_mean`: clip each update's delta, average equally, add noise.

    The client weights in ``updates`` are ignored: DP-FedAvg's sensitivity bound C / m needs equal weights.
    ``num_clients`` is the fixed denominator m (the federation's size); when fewer updates arrive, their sum is
    still divided by m, which keeps the sensitivity at C / m.
    """
    import torch

    def clipped_deltas() -> Iterator[tuple[dict[str, torch.Tensor], float]]:
        for tensors, _ in updates:
            kept = aggregation.clip_to_norm(tensors, reference, clip)
            yield {name: t.float() - reference[name].float() for name, t in kept.items()}, 1.0 / num_clients

    # The mean is taken over the deltas, so that with fewer than m updates the reference is not shrunk with them.
    mean_delta = aggregation.weighted_mean(clipped_deltas())
    generator = torch.Generator().manual_seed(seed)
    std = noise_multiplier * clip / num_clients
    result = {}
    for name, d in sorted(mean_delta.items()):
        if noise_multiplier != 0:
            d = d + torch.normal(0.0, std, size=d.shape, generator=generator, dtype=torch.float32)
        result[name] = (reference[name].float() + d).to(reference[name].dtype)
    return result
