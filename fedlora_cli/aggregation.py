"""Aggregation math: pure functions over named tensors.

No I/O and no state: the coordinator (``fedlora_cli.federation.aggregate_round``) reads client updates and
feeds them here one at a time, so the running sum is the only thing that grows with the adapter and nothing
grows with the number of clients.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from fedlora_cli.errors import FedloraError

if TYPE_CHECKING:
    import torch

Tensors = Mapping[str, "torch.Tensor"]


def client_weights(num_examples: Sequence[int], uniform: bool = False) -> list[float]:
    """p_k = n_k / sum(n), or 1/K each when ``uniform``."""
    if not num_examples:
        raise FedloraError("no client updates to aggregate")
    if uniform:
        return [1.0 / len(num_examples)] * len(num_examples)
    if any(n <= 0 for n in num_examples):
        raise FedloraError("every client update must report a positive number of examples")
    total = float(sum(num_examples))
    return [n / total for n in num_examples]


def _accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    import torch

    return torch.float64 if dtype == torch.float64 else torch.float32


def weighted_mean(updates: Iterable[tuple[Tensors, float]]) -> dict[str, torch.Tensor]:
    """sum_k w_k * T_k for every tensor name, consuming ``updates`` one at a time.

    ``updates`` yields (tensors, weight) pairs; the weights should sum to one. Every update must carry the
    same names, shapes and dtypes as the first; the result keeps the first update's dtypes. Low-precision
    tensors are summed in float32.
    """
    total: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    count = 0
    for tensors, weight in updates:
        if count == 0:
            for name, t in tensors.items():
                dtypes[name] = t.dtype
                total[name] = t.to(_accumulator_dtype(t.dtype)) * weight
        else:
            if set(tensors) != set(total):
                raise FedloraError("client updates carry different tensor names")
            for name, t in tensors.items():
                if t.shape != total[name].shape or t.dtype != dtypes[name]:
                    raise FedloraError(f"tensor '{name}' differs in shape or dtype between client updates")
                total[name].add_(t.to(total[name].dtype), alpha=weight)
        count += 1
    if count == 0:
        raise FedloraError("no client updates to aggregate")
    return {name: t.to(dtypes[name]) for name, t in total.items()}


def update_norm(update: Tensors, reference: Tensors) -> float:
    """L2 norm of (update - reference) over the update's tensors: how far a client moved the global."""
    import torch

    squared = 0.0
    for name, t in update.items():
        # Per-tensor norms in float32 (torch sums them pairwise); squares are combined in Python's float64.
        squared += float(torch.linalg.vector_norm(t.float() - reference[name].float())) ** 2
    return squared**0.5


def nonfinite(tensors: Tensors) -> str | None:
    """The name of the first tensor holding NaN or Inf, or None."""
    import torch

    for name, t in tensors.items():
        # A sum is finite whenever every element is (NaN and Inf propagate), so one cheap reduction clears the
        # usual case; only a non-finite sum (which a float overflow of finite values can also cause) is checked
        # element by element.
        if t.is_floating_point() and not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all()):
            return name
    return None
