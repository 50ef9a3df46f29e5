"""Aggregation math: pure functions over named tensors.

No I/O and no state: the coordinator (``fedlora_cli.federation.aggregate_round``) reads client updates and
the strategies (:mod:`fedlora_cli.aggregation.strategies`) feed them here. The strategies
(``federation.aggregation``)::

    mean          sum_k p_k T_k for every sent tensor T (FedAvg; FedIT when T is A or B). Streams one client
                  update at a time: memory is one running sum, flat in the number of clients.
    svd           FlexLoRA (Bai et al., NeurIPS 2024, arXiv 2402.11505): per layer, the weighted sum of the
                  clients' effective updates M = sum_k p_k s_k B_k A_k, then a truncated SVD M / s = U S V^T
                  back to the global rank r, stored as B = U_r S_r and A = V_r^T. Clients may train lower
                  ranks (HetLoRA's setting, Cho et al. 2024); each receives the global truncated to its rank.
                  Streams clients into one dense (out x in) sum per layer: flat in the number of clients.
    exact         FedEx-LoRA (Singhal et al., ACL 2025, arXiv 2410.09432): A and B are averaged as in FedIT and
                  the residual s (sum_k p_k B_k A_k - avg(B) avg(A)) is folded into a dense per-layer
                  correction of the base weight, so the global update is exactly the weighted mean of the
                  clients' updates. Flat in the number of clients; one dense tensor per adapted layer.
    median        coordinate-wise median (Yin et al., ICML 2018), equal client weights
    trimmed-mean  coordinate-wise mean after dropping the floor(beta K) smallest and largest values
                  (Yin et al., ICML 2018), equal client weights

The robust statistics need every client's value of a coordinate at once: their memory grows with the number
of clients, one tensor name at a time. They ignore the client weights on purpose, since a malicious client
can claim any number of examples. A norm bound (:func:`clip_to_norm`, or rejecting the update) limits how far
any client can move the global before any strategy runs.

svd and exact report, per layer, how far plain averaging of A and B would have been from the exact weighted
mean of the products: ||avg(B) avg(A) - avg(B A)||_F / ||avg(B A)||_F (FedIT's error), in effective-update
units (each factor scaled by the square root of its LoRA scale, ranks zero-padded to the global's).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
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
    total = sum(num_examples)  # exact integer sum: n / total is in [0, 1] however large the counts
    return [n / total for n in num_examples]


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    import torch

    return torch.float64 if dtype == torch.float64 else torch.float32


def weighted_mean(updates: Iterable[tuple[Tensors, float]]) -> dict[str, torch.Tensor]:
    """sum_k w_k * T_k for every tensor name, consuming ``updates`` one at a time.

    ``updates`` yields (tensors, weight) pairs; the weights should sum to one. Every update must carry the
    same names, shapes and dtypes as the first; the result keeps the first update's dtypes. Low-precision
    tensors are summed in float32. Each update is weighted, then added: two roundings, as the numpy round does
    (:mod:`.arrays`), not one fused multiply-add, whose use would depend on torch's kernel for the CPU.
    """
    total: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    count = 0
    for tensors, weight in updates:
        if count == 0:
            for name, t in tensors.items():
                dtypes[name] = t.dtype
                total[name] = t.to(accumulator_dtype(t.dtype)) * weight
        else:
            if set(tensors) != set(total):
                raise FedloraError("client updates carry different tensor names")
            for name, t in tensors.items():
                if t.shape != total[name].shape or t.dtype != dtypes[name]:
                    raise FedloraError(f"tensor '{name}' differs in shape or dtype between client updates")
                total[name].add_(t.to(total[name].dtype) * weight)
        count += 1
    if count == 0:
        raise FedloraError("no client updates to aggregate")
    return {name: t.to(dtypes[name]) for name, t in total.items()}


def clip_to_norm(update: Tensors, reference: Tensors, bound: float) -> dict[str, torch.Tensor]:
    """reference + (update - reference) scaled to L2 norm at most ``bound`` (over all tensors together)."""
    norm = update_norm(update, reference)
    scale = min(1.0, bound / norm) if norm > 0 else 1.0
    if scale == 1.0:
        return dict(update)
    return {name: (reference[name] + (t - reference[name]) * scale).to(t.dtype) for name, t in update.items()}


# A clipped delta is scaled a hair below the bound: float32 rounding of the scaled elements (relative 2^-24 each)
# must not carry its norm above it, since a sensitivity bound is a bound.
_CLIP_MARGIN = 1 - 2**-20


def clipped_delta(update: Tensors, reference: Tensors, bound: float) -> dict[str, torch.Tensor]:
    """The float32 difference (update - reference), scaled to L2 norm at most ``bound`` over all tensors.

    Taken in float32 before any scaling, and never rounded back to the tensors' own dtype: a bfloat16 update
    clipped as ``reference + scaled delta`` and rounded to bfloat16 could land well beyond the bound.
    """
    import torch

    deltas = {name: t.float() - reference[name].float() for name, t in update.items()}
    norm = sum(float(torch.linalg.vector_norm(d, dtype=torch.float64)) ** 2 for d in deltas.values()) ** 0.5
    if norm <= bound:
        return deltas
    scale = bound / norm * _CLIP_MARGIN
    return {name: d * scale for name, d in deltas.items()}


def update_norm(update: Tensors, reference: Tensors) -> float:
    """L2 norm of (update - reference) over the update's tensors: how far a client moved the global.

    Measured by :func:`.arrays.squared_distance` per tensor (numpy, over the tensors' memory), combined in
    Python's float64 in name order: exactly as the numpy round measures, so the norm bound judges alike.
    """
    from fedlora_cli.aggregation.arrays import squared_distance

    return sum(squared_distance(update[name], reference[name]) for name in sorted(update)) ** 0.5


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


# --------------------------------------------------------------------------------------------------------
# Robust statistics: coordinate-wise over the clients' values of one tensor


def trim_count(fraction: float, clients: int, label: str | None = None) -> int:
    """How many values a trimmed mean drops at each end: floor(fraction x clients), at least 1, leaving one.

    The one home of the trim rule: recipe validation and the coordinator pass ``label``, the setting's name, for
    a message in its terms.
    """
    trimmed = int(fraction * clients)
    if trimmed >= 1 and clients - 2 * trimmed >= 1:
        return trimmed
    if label is None:
        raise FedloraError(
            f"trimmed mean with trim fraction {fraction:g} over {clients} client updates drops "
            f"{'none' if trimmed < 1 else 'all'} of them; use 'median' or another fraction"
        )
    if trimmed < 1:
        raise FedloraError(
            f"{label} is {fraction:g}, which trims no client out of {clients} (floor({fraction:g} x {clients}) = 0); "
            f"use at least {1 / clients:.3g}, or aggregation 'median'"
        )
    raise FedloraError(f"{label} is {fraction:g}, which trims every one of {clients} clients")


def _stacked(values: Sequence[torch.Tensor]) -> torch.Tensor:
    import torch

    if not values:
        raise FedloraError("no client updates to aggregate")
    first = values[0]
    for v in values[1:]:
        if v.shape != first.shape or v.dtype != first.dtype:
            raise FedloraError("a tensor differs in shape or dtype between client updates")
    return torch.stack([v.to(accumulator_dtype(v.dtype)) for v in values])


def coordinate_median(values: Sequence[torch.Tensor]) -> torch.Tensor:
    """The median of every coordinate over the clients; with an even count, the mean of the two middle values."""
    stacked = _stacked(values)
    ordered = stacked.sort(dim=0).values
    k = ordered.shape[0]
    middle = ordered[(k - 1) // 2] if k % 2 else (ordered[k // 2 - 1] + ordered[k // 2]) / 2
    return middle.to(values[0].dtype)


def trimmed_mean(values: Sequence[torch.Tensor], trim: int) -> torch.Tensor:
    """The mean of every coordinate after dropping its ``trim`` smallest and ``trim`` largest client values."""
    stacked = _stacked(values)
    k = stacked.shape[0]
    if trim < 0 or k - 2 * trim < 1:
        raise FedloraError(f"cannot trim {trim} values at each end of {k}")
    ordered = stacked.sort(dim=0).values
    return ordered[trim : k - trim].mean(dim=0).to(values[0].dtype)


# --------------------------------------------------------------------------------------------------------
# Aggregating the products B_k A_k of LoRA-type adapters, one layer at a time


@dataclass
class LayerReport:
    """How far plain averaging of A and B is from the exact weighted mean of the products, for one layer.

    ``mean_error``       ||avg(B) avg(A) - avg(B A)||_F / ||avg(B A)||_F (None when both are zero-free and 0/0)
    ``truncation_error`` svd only: ||B A - avg(B A)||_F / ||avg(B A)||_F of the rank-r result
    ``rank``             svd only: the numerical rank of avg(B A) before truncation
    """

    mean_error: float | None
    truncation_error: float | None = None
    rank: int | None = None


def _relative(diff: float, norm: float) -> float | None:
    if norm > 0:
        return diff / norm
    return 0.0 if diff == 0 else None


# One client's factors of one layer: (A_k, B_k, weight p_k, LoRA scale s_k).
Factors = tuple["torch.Tensor", "torch.Tensor", float, float]


def svd_layer(factors: Iterable[Factors], rank: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, LayerReport]:
    """FlexLoRA for one layer: rank-``rank`` factors (A, B) whose ``scale * B A`` best approximates
    M = sum_k p_k s_k B_k A_k (Eckart-Young); exact when M has rank at most ``rank``.

    Clients may have any ranks up to ``rank``. Returns A = V_r^T (orthonormal rows) and B = U_r S_r / scale,
    sorted by singular value, so the first r' rows of A and columns of B are the best rank-r' approximation.
    A keeps unit-norm rows even where a singular value is zero, so no direction of the next round's B starts
    with a zero gradient (splitting sqrt(S) into both factors would leave such directions dead for good).
    ``factors`` is consumed one client at a time: memory is one dense (out x in) sum, whatever the number of
    clients. Computed in float64; returned in the clients' dtype.
    """
    import torch

    total = a_plain = b_plain = None
    dtype = None
    for a, b, weight, s in factors:
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise FedloraError(f"lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not form a product B A")
        r_k = a.shape[0]
        if r_k > rank:
            raise FedloraError(f"a client update has rank {r_k}, above the global rank {rank}")
        if total is None:
            dtype = a.dtype
            total = torch.zeros(b.shape[0], a.shape[1], dtype=torch.float64)
            a_plain = torch.zeros(rank, a.shape[1], dtype=torch.float64)
            b_plain = torch.zeros(b.shape[0], rank, dtype=torch.float64)
        elif (b.shape[0], a.shape[1]) != tuple(total.shape):
            raise FedloraError("lora_A / lora_B shapes of one layer differ between client updates")
        a64, b64 = a.double(), b.double()
        total.addmm_(b64, a64, alpha=weight * s)
        root = (s / scale) ** 0.5
        a_plain[:r_k].add_(a64, alpha=weight * root)
        b_plain[:, :r_k].add_(b64, alpha=weight * root)
    if total is None:
        raise FedloraError("no client updates to aggregate")
    target = total / scale  # M in the global adapter's units: scale * B A = M
    u, sv, vh = torch.linalg.svd(target, full_matrices=False)
    keep = min(rank, sv.shape[0])
    a_new = torch.zeros(rank, target.shape[1], dtype=torch.float64)
    b_new = torch.zeros(target.shape[0], rank, dtype=torch.float64)
    a_new[:keep] = vh[:keep]
    b_new[:, :keep] = u[:, :keep] * sv[:keep]
    norm = float(torch.linalg.vector_norm(sv))
    lost = float(torch.linalg.vector_norm(sv[keep:])) if sv.shape[0] > keep else 0.0
    tolerance = float(sv[0]) * max(target.shape) * torch.finfo(torch.float64).eps if sv.numel() else 0.0
    report = LayerReport(
        mean_error=_relative(float(torch.linalg.matrix_norm(b_plain @ a_plain - target)), norm),
        truncation_error=_relative(lost, norm),
        rank=int((sv > tolerance).sum()),
    )
    return a_new.to(dtype), b_new.to(dtype), report


def exact_layer(
    factors: Iterable[Factors], scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, LayerReport]:
    """FedEx-LoRA for one layer: A = sum p_k A_k, B = sum p_k B_k, and the dense residual
    R = sum_k p_k s_k B_k A_k - scale * B A, so that ``scale * B A + R`` is exactly the weighted mean of the
    clients' effective updates. Every client must have the same rank. Returns (A, B, R, report); R is float32
    (float64 inputs stay float64). Consumed one client at a time: memory is one dense (out x in) sum.
    """
    import torch

    total = a_sum = b_sum = None
    dtype = None
    for a, b, weight, s in factors:
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise FedloraError(f"lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not form a product B A")
        if total is None:
            dtype = a.dtype
            total = torch.zeros(b.shape[0], a.shape[1], dtype=torch.float64)
            a_sum = torch.zeros(a.shape, dtype=torch.float64)
            b_sum = torch.zeros(b.shape, dtype=torch.float64)
        elif a.shape != a_sum.shape or b.shape != b_sum.shape:
            raise FedloraError("exact aggregation needs every client to train the same rank")
        a64, b64 = a.double(), b.double()
        total.addmm_(b64, a64, alpha=weight * s)
        a_sum.add_(a64, alpha=weight)
        b_sum.add_(b64, alpha=weight)
    if total is None:
        raise FedloraError("no client updates to aggregate")
    residual = total - scale * (b_sum @ a_sum)
    report = LayerReport(
        mean_error=_relative(float(torch.linalg.matrix_norm(residual)), float(torch.linalg.matrix_norm(total)))
    )
    out = torch.float64 if dtype == torch.float64 else torch.float32
    return a_sum.to(dtype), b_sum.to(dtype), residual.to(out), report


def to_rank(a: torch.Tensor, b: torch.Tensor, rank: int, scale_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The global factors of one layer as a client of rank ``rank`` receives them.

    The first ``rank`` rows of A and columns of B (the best rank-``rank`` part, since svd aggregation sorts
    them by singular value), with B multiplied by ``scale_ratio`` = s_global / s_client so that the client's
    own LoRA scale gives the same effective update.
    """
    if rank > a.shape[0]:
        raise FedloraError(f"cannot give rank {rank} from a global adapter of rank {a.shape[0]}")
    a_k = a[:rank].clone()
    b_k = b[:, :rank].clone()
    if scale_ratio != 1.0:
        b_k = (b_k.to(accumulator_dtype(b_k.dtype)) * scale_ratio).to(b.dtype)
    return a_k, b_k
