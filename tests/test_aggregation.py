"""Aggregation math on hand-made tensors (Prepare / Execute / Assert)."""

from __future__ import annotations

import pytest
import torch

from fedlora_cli import aggregation
from fedlora_cli.errors import FedloraError


def test_weighted_mean_matches_hand_computation():
    a = {"x": torch.tensor([1.0, 2.0]), "y": torch.tensor([[0.0, 4.0]])}
    b = {"x": torch.tensor([3.0, 6.0]), "y": torch.tensor([[2.0, 0.0]])}
    weights = aggregation.client_weights([1, 3])

    result = aggregation.weighted_mean(iter([(a, weights[0]), (b, weights[1])]))

    assert weights == [0.25, 0.75]
    torch.testing.assert_close(result["x"], torch.tensor([0.25 * 1 + 0.75 * 3, 0.25 * 2 + 0.75 * 6]))
    torch.testing.assert_close(result["y"], torch.tensor([[1.5, 1.0]]))


def test_weighted_mean_keeps_dtype_and_sums_low_precision_in_float32():
    a = {"w": torch.full((4,), 1.0, dtype=torch.bfloat16)}
    result = aggregation.weighted_mean([(a, 0.5), (a, 0.5)])
    assert result["w"].dtype == torch.bfloat16
    assert torch.equal(result["w"], a["w"])


def test_identical_updates_are_a_fixed_point():
    t = {"w": torch.randn(5, 3, generator=torch.Generator().manual_seed(0))}
    weights = aggregation.client_weights([7, 1, 100])
    result = aggregation.weighted_mean((t, w) for w in weights)
    torch.testing.assert_close(result["w"], t["w"])


def test_uniform_weights():
    assert aggregation.client_weights([1, 100, 10], uniform=True) == pytest.approx([1 / 3] * 3)


def test_consumes_one_update_at_a_time():
    """The iterator is pulled lazily: a generator that fails on its third item has already fed two."""
    fed = []

    def stream():
        for k in range(3):
            if k == 2:
                raise FedloraError("third update is bad")
            fed.append(k)
            yield {"w": torch.ones(2) * k}, 0.5

    with pytest.raises(FedloraError, match="third"):
        aggregation.weighted_mean(stream())
    assert fed == [0, 1]


@pytest.mark.parametrize(
    "second, message",
    [
        ({"v": torch.ones(2)}, "names"),
        ({"w": torch.ones(3)}, "shape"),
        ({"w": torch.ones(2, dtype=torch.float64)}, "dtype"),
    ],
)
def test_mismatched_updates_are_rejected(second, message):
    with pytest.raises(FedloraError, match=message):
        aggregation.weighted_mean([({"w": torch.ones(2)}, 0.5), (second, 0.5)])


def test_no_updates_or_bad_counts():
    with pytest.raises(FedloraError):
        aggregation.weighted_mean([])
    with pytest.raises(FedloraError):
        aggregation.client_weights([])
    with pytest.raises(FedloraError):
        aggregation.client_weights([3, 0])


def test_update_norm_and_nonfinite():
    ref = {"w": torch.zeros(2), "v": torch.ones(1)}
    assert aggregation.update_norm({"w": torch.tensor([3.0, 4.0])}, ref) == pytest.approx(5.0)
    assert aggregation.nonfinite({"w": torch.tensor([1.0, float("nan")])}) == "w"
    assert aggregation.nonfinite({"w": torch.tensor([1.0, float("-inf")])}) == "w"
    assert aggregation.nonfinite(ref) is None
    # Finite values whose float32 sum overflows are still finite.
    assert aggregation.nonfinite({"w": torch.tensor([3e38, 3e38, -1.0])}) is None
    assert aggregation.nonfinite({"w": torch.tensor([3e38, 3e38, float("inf")])}) == "w"
