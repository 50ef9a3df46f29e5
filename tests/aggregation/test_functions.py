"""fedlora_cli.aggregation.functions: the aggregation math on hand-made numpy arrays (Prepare / Execute / Assert)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedlora_cli import aggregation
from fedlora_cli.errors import FedloraError
from fedlora_cli.storage.mapped import narrow, widen


def tensor(values, dtype=np.float32) -> np.ndarray:
    return np.array(values, dtype=dtype)


def assert_close(actual: np.ndarray, expected, rtol: float = 1.3e-6, atol: float = 1e-5) -> None:
    """torch.testing.assert_close's float32 defaults (and its dtype check), for arrays."""
    expected = np.asarray(expected)
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def test_weighted_mean_matches_hand_computation():
    a = {"x": tensor([1.0, 2.0]), "y": tensor([[0.0, 4.0]])}
    b = {"x": tensor([3.0, 6.0]), "y": tensor([[2.0, 0.0]])}
    weights = aggregation.client_weights([1, 3])

    result = aggregation.weighted_mean(iter([(a, weights[0]), (b, weights[1])]))

    assert weights == [0.25, 0.75]
    assert_close(result["x"], tensor([0.25 * 1 + 0.75 * 3, 0.25 * 2 + 0.75 * 6]))
    assert_close(result["y"], tensor([[1.5, 1.0]]))


def test_weighted_mean_keeps_dtype_and_sums_low_precision_in_float32():
    stored = narrow(np.full(4, 1.0, np.float32), "BF16")  # a bfloat16 tensor as the coordinator reads it
    a = {"w": widen(stored)}
    result = aggregation.weighted_mean([(a, 0.5), (a, 0.5)])
    assert result["w"].dtype == np.float32
    assert np.array_equal(narrow(result["w"], "BF16"), stored)
    assert aggregation.weighted_mean([({"w": np.ones(2)}, 0.5)])["w"].dtype == np.float64


def test_identical_updates_are_a_fixed_point():
    t = {"w": rng(0).standard_normal((5, 3), dtype=np.float32)}
    weights = aggregation.client_weights([7, 1, 100])
    result = aggregation.weighted_mean((t, w) for w in weights)
    assert_close(result["w"], t["w"])


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
            yield {"w": np.ones(2, np.float32) * k}, 0.5

    with pytest.raises(FedloraError, match="third"):
        aggregation.weighted_mean(stream())
    assert fed == [0, 1]


@pytest.mark.parametrize(
    "second, message",
    [
        ({"v": np.ones(2, np.float32)}, "names"),
        ({"w": np.ones(3, np.float32)}, "shape"),
        ({"w": np.ones(2, np.float64)}, "dtype"),
    ],
)
def test_mismatched_updates_are_rejected(second, message):
    with pytest.raises(FedloraError, match=message):
        aggregation.weighted_mean([({"w": np.ones(2, np.float32)}, 0.5), (second, 0.5)])


def test_no_updates_or_bad_counts():
    with pytest.raises(FedloraError):
        aggregation.weighted_mean([])
    with pytest.raises(FedloraError):
        aggregation.client_weights([])
    with pytest.raises(FedloraError):
        aggregation.client_weights([3, 0])


def test_update_norm_and_nonfinite():
    ref = {"w": np.zeros(2, np.float32), "v": np.ones(1, np.float32)}
    assert aggregation.update_norm({"w": tensor([3.0, 4.0])}, ref) == pytest.approx(5.0)
    assert aggregation.nonfinite({"w": tensor([1.0, float("nan")])}) == "w"
    assert aggregation.nonfinite({"w": tensor([1.0, float("-inf")])}) == "w"
    assert aggregation.nonfinite(ref) is None
    # Finite values whose float32 sum overflows are still finite.
    assert aggregation.nonfinite({"w": tensor([3e38, 3e38, -1.0])}) is None
    assert aggregation.nonfinite({"w": tensor([3e38, 3e38, float("inf")])}) == "w"
    # A client checks its torch tensors with the same function before it sends them.
    assert aggregation.nonfinite({"w": torch.tensor([1.0, float("nan")])}) == "w"
    assert aggregation.nonfinite({"w": torch.tensor([3e38, 3e38, -1.0])}) is None


# Robust statistics -----------------------------------------------------------------------------------------


def test_median_matches_hand_computation():
    values = [tensor([1.0, 9.0, -2.0]), tensor([3.0, 5.0, 0.0]), tensor([2.0, 7.0, 4.0])]

    odd = aggregation.coordinate_median(values)
    even = aggregation.coordinate_median([*values, tensor([10.0, 6.0, 1.0])])

    assert_close(odd, tensor([2.0, 7.0, 0.0]))
    # Four values: the mean of the two middle ones, coordinate by coordinate.
    assert_close(even, tensor([(2.0 + 3.0) / 2, (6.0 + 7.0) / 2, (0.0 + 1.0) / 2]))


def test_trimmed_mean_matches_hand_computation():
    values = [tensor([1.0, 100.0]), tensor([2.0, -50.0]), tensor([3.0, 4.0]), tensor([4.0, 6.0]), tensor([50.0, 5.0])]

    result = aggregation.trimmed_mean(values, trim=1)

    # Drop the smallest and largest per coordinate: [2, 3, 4] and [4, 5, 6].
    assert_close(result, tensor([3.0, 5.0]))
    assert aggregation.trim_count(0.2, 5) == 1
    assert aggregation.trim_count(0.25, 8) == 2
    with pytest.raises(FedloraError, match="drops none"):
        aggregation.trim_count(0.1, 4)


@pytest.mark.parametrize("statistic", ["median", "trimmed-mean"])
def test_one_poisoned_client_stays_within_the_honest_range(statistic):
    generator = rng(3)
    honest = [generator.standard_normal((6, 5), dtype=np.float32) * np.float32(0.1) for _ in range(4)]
    poisoned = np.full((6, 5), 1e6, np.float32)
    values = [honest[0], honest[1], poisoned, honest[2], honest[3]]

    if statistic == "median":
        result = aggregation.coordinate_median(values)
    else:
        result = aggregation.trimmed_mean(values, aggregation.trim_count(0.2, len(values)))

    low, high = np.stack(honest).min(axis=0), np.stack(honest).max(axis=0)
    assert bool(((result >= low) & (result <= high)).all())
    # The plain mean is dragged far out: the test would fail without a robust statistic.
    mean = aggregation.weighted_mean(({"w": v}, 0.2) for v in values)["w"]
    assert not bool(((mean >= low) & (mean <= high)).all())


def test_clip_to_norm_scales_the_difference_only():
    ref = {"w": tensor([1.0, 1.0]), "v": tensor([0.0])}
    update = {"w": tensor([4.0, 5.0]), "v": tensor([0.0])}  # difference (3, 4, 0): norm 5

    clipped = aggregation.clip_to_norm(update, ref, 1.0)
    untouched = aggregation.clip_to_norm(update, ref, 10.0)

    assert_close(clipped["w"], tensor([1.6, 1.8]))
    assert aggregation.update_norm(clipped, ref) == pytest.approx(1.0)
    assert all(np.array_equal(untouched[n], update[n]) for n in update)


# Products B A: svd (FlexLoRA) and exact (FedEx-LoRA) ---------------------------------------------------------


def factors(seed: int, rank: int, d: int = 7, k: int = 5, dtype=np.float64):
    g = rng(seed)
    return g.standard_normal((rank, k)).astype(dtype), g.standard_normal((d, rank)).astype(dtype)


def weighted_product(clients, weights, scales):
    """sum_k p_k s_k B_k A_k, computed directly."""
    return sum(w * s * (b.astype(np.float64) @ a.astype(np.float64)) for (a, b), w, s in zip(clients, weights, scales))


def svdvals(m: np.ndarray) -> np.ndarray:
    return np.linalg.svd(m, compute_uv=False)


def test_svd_reproduces_a_weighted_sum_of_rank_at_most_r():
    # Two clients of rank 2: the weighted sum has rank at most 4 = r.
    clients = [factors(1, 2), factors(2, 2)]
    weights, scale = [0.3, 0.7], 2.0

    a, b, report = aggregation.svd_layer(((a, b, w, scale) for (a, b), w in zip(clients, weights)), rank=4, scale=scale)

    assert_close(scale * (b @ a), weighted_product(clients, weights, [scale] * 2), rtol=1e-10, atol=1e-10)
    assert a.shape == (4, 5) and b.shape == (7, 4)
    assert report.truncation_error == pytest.approx(0.0, abs=1e-12)
    assert report.rank == 4
    assert report.mean_error > 0.01  # averaging A and B apart would have been off


def test_svd_truncates_to_the_best_rank_r_approximation():
    clients = [factors(k, 3) for k in range(3)]  # rank up to 9
    weights = [0.2, 0.3, 0.5]

    a, b, report = aggregation.svd_layer(((a, b, w, 1.0) for (a, b), w in zip(clients, weights)), rank=4, scale=1.0)

    target = weighted_product(clients, weights, [1.0] * 3)
    s = svdvals(target)
    best = float(np.linalg.norm(s[4:]) / np.linalg.norm(s))
    assert report.truncation_error == pytest.approx(best)
    assert float(np.linalg.norm(b @ a - target) / np.linalg.norm(target)) == pytest.approx(best)
    # A has orthonormal rows; B carries the singular values, largest first.
    assert_close(a @ a.T, np.eye(4), rtol=1e-7, atol=1e-7)
    assert_close(np.linalg.norm(b, axis=0), s[:4], rtol=1e-7, atol=1e-7)


def test_svd_heterogeneous_ranks_and_what_each_client_receives():
    # LoRA scales differ with the rank (alpha / r): the global works in effective units.
    alpha, global_rank = 8.0, 4
    ranks = [1, 2, 4]
    clients = [factors(10 + k, r) for k, r in enumerate(ranks)]
    weights = [0.5, 0.25, 0.25]
    scales = [alpha / r for r in ranks]

    a, b, report = aggregation.svd_layer(
        ((a, b, w, s) for (a, b), w, s in zip(clients, weights, scales)), rank=global_rank, scale=alpha / global_rank
    )

    # Rank 1 + 2 + 4 = 7 > 4: truncated; the global holds rank 4.
    assert a.shape == (4, 5) and b.shape == (7, 4)
    target = weighted_product(clients, weights, scales)
    for r in ranks:
        a_k, b_k = aggregation.to_rank(a, b, r, (alpha / global_rank) / (alpha / r))
        assert a_k.shape == (r, 5) and b_k.shape == (7, r)
        # What the client holds, at its own scale, is the best rank-r approximation of the global's update.
        s = svdvals(target)
        err = np.linalg.norm((alpha / r) * (b_k @ a_k) - target)
        assert float(err) == pytest.approx(float(np.linalg.norm(s[r:])), rel=1e-9)


def test_svd_of_identical_updates_is_a_fixed_point_of_the_product():
    a0, b0 = factors(5, 3)
    weights = aggregation.client_weights([7, 1, 100])

    a, b, report = aggregation.svd_layer(((a0, b0, w, 2.0) for w in weights), rank=3, scale=2.0)

    # Factors are re-expressed (A orthonormal), the update B A they make is the same.
    assert_close(b @ a, b0 @ a0, rtol=1e-10, atol=1e-10)
    assert report.mean_error == pytest.approx(0.0, abs=1e-12)
    assert report.truncation_error == pytest.approx(0.0, abs=1e-12)
    again_a, again_b, _ = aggregation.svd_layer(((a, b, w, 2.0) for w in weights), rank=3, scale=2.0)
    assert_close(again_b @ again_a, b0 @ a0, rtol=1e-10, atol=1e-10)


def test_svd_keeps_float32_inputs_float32():
    clients = [factors(k, 2, dtype=np.float32) for k in range(2)]
    a, b, _ = aggregation.svd_layer(((a, b, 0.5, 1.0) for a, b in clients), rank=2, scale=1.0)
    assert a.dtype == b.dtype == np.float32


def test_exact_equals_the_weighted_mean_of_the_products():
    clients = [factors(20 + k, 3, dtype=np.float32) for k in range(4)]
    weights = aggregation.client_weights([10, 20, 30, 40])
    scale = 16.0 / 3

    a, b, residual, report = aggregation.exact_layer(((a, b, w, scale) for (a, b), w in zip(clients, weights)), scale)

    expected = weighted_product(clients, weights, [scale] * 4)
    f64 = np.float64
    assert_close(scale * (b.astype(f64) @ a.astype(f64)) + residual.astype(f64), expected, rtol=1e-5, atol=1e-5)
    # A and B are FedIT's averages; the residual is exactly FedIT's error.
    assert_close(a, sum(np.float32(w) * x for (x, _), w in zip(clients, weights)))
    assert_close(b, sum(np.float32(w) * y for (_, y), w in zip(clients, weights)))
    assert residual.dtype == np.float32
    fedit = scale * (b.astype(f64) @ a.astype(f64))
    error = float(np.linalg.norm(fedit - expected) / np.linalg.norm(expected))
    assert report.mean_error == pytest.approx(error, rel=1e-5)
    assert error > 0.01


def test_exact_refuses_different_ranks():
    with pytest.raises(FedloraError, match="same rank"):
        aggregation.exact_layer(iter([(*factors(1, 2), 0.5, 1.0), (*factors(2, 3), 0.5, 1.0)]), 1.0)



def test_svd_of_the_factors_is_the_dense_svd_and_its_signs_are_fixed():
    # Three clients of rank 2 on a 40 x 30 layer: M has rank 6 < 30, so svd_layer never forms it densely.
    clients = [factors(30 + k, 2, d=40, k=30) for k in range(3)]
    weights = [0.2, 0.3, 0.5]

    a, b, report = aggregation.svd_layer(((a, b, w, 1.0) for (a, b), w in zip(clients, weights)), rank=4, scale=1.0)

    target = weighted_product(clients, weights, [1.0] * 3)
    u, s, vh = np.linalg.svd(target)
    assert_close(b @ a, (u[:, :4] * s[:4]) @ vh[:4], rtol=1e-10, atol=1e-10)  # the best rank-4 approximation
    assert_close(np.abs(a), np.abs(vh[:4]), rtol=1e-9, atol=1e-12)
    assert (a[np.arange(4), np.abs(a).argmax(axis=1)] > 0).all(), "each row of A has its largest entry positive"
    assert report.rank == 6
    assert report.truncation_error == pytest.approx(float(np.linalg.norm(s[4:]) / np.linalg.norm(s)))
    a_plain, b_plain = np.zeros((4, 30)), np.zeros((40, 4))
    for (a_k, b_k), w in zip(clients, weights):
        a_plain[:2] += w * a_k
        b_plain[:, :2] += w * b_k
    by_hand = float(np.linalg.norm(b_plain @ a_plain - target) / np.linalg.norm(s))
    assert report.mean_error == pytest.approx(by_hand, rel=1e-10)
