"""fedlora_cli.aggregation.arrays: the mean's arithmetic over numpy arrays, bit for bit the torch backend's it
replaced (its weighted_mean, clip_to_norm and Mean's renormalisation, restated here in torch as the reference), and
the norms every strategy measures with."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedlora_cli import aggregation
from fedlora_cli.aggregation.arrays import WeightedSum, as_array, nonfinite, scratch_buffers, squared_distance
from fedlora_cli.errors import FedloraError
from fedlora_cli.storage.mapped import narrow

# Weights that are not exact in float32 (or binary at all), as example counts give them.
WEIGHTS = aggregation.client_weights([137, 1009, 4, 77])


def random_updates(dtype: torch.dtype, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [{"a": torch.randn(16, 300, generator=generator, dtype=dtype),
             "b": torch.randn(7, generator=generator, dtype=dtype) * 1e-3} for _ in WEIGHTS]


def bits(t: torch.Tensor | np.ndarray) -> bytes:
    return np.ascontiguousarray(t.numpy() if isinstance(t, torch.Tensor) else t).tobytes()


def torch_weighted_mean(updates) -> dict[str, torch.Tensor]:
    """The torch backend's weighted mean, as it was: each update weighted in its dtype, then added."""
    total: dict[str, torch.Tensor] = {}
    for tensors, weight in updates:
        for name, t in tensors.items():
            if name in total:
                total[name].add_(t * weight)
            else:
                total[name] = t * weight
    return total


def arrays(tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {n: t.numpy() for n, t in tensors.items()}


@pytest.mark.parametrize("room", [False, True], ids=["own arrays", "room given"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_weighted_sum_is_the_torch_weighted_mean_bit_for_bit(dtype, room):
    updates = random_updates(dtype)
    given = {n: np.empty_like(t.numpy()) for n, t in updates[0].items()} if room else None
    sums = WeightedSum(room=given)
    buffers = scratch_buffers({n: t.numpy() for n, t in updates[0].items()})

    for update, w in zip(updates, WEIGHTS):
        for name, t in update.items():
            sums.add(name, t.numpy(), w, buffers)
    expected = torch_weighted_mean(zip(updates, WEIGHTS))

    assert set(sums.tensors) == set(expected)
    by_function = aggregation.weighted_mean(zip(map(arrays, updates), WEIGHTS))
    assert all(bits(by_function[n]) == bits(expected[n]) for n in expected)
    assert all(sums.tensors[n].dtype == expected[n].numpy().dtype for n in expected)
    assert all(bits(sums.tensors[n]) == bits(expected[n]) for n in expected)
    assert all(sums.tensors[n] is given[n] for n in expected) if room else True


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_clipped_and_renormalised_sums_are_the_torch_paths_bit_for_bit(dtype):
    updates = random_updates(dtype, seed=1)
    reference = random_updates(dtype, seed=2)[0]
    clips = [1.0, 0.3, 1.0, 0.07]
    sums = WeightedSum()

    for update, w, c in zip(updates, WEIGHTS, clips):
        for name, t in update.items():
            if c == 1.0:
                sums.add(name, t.numpy(), w)
            else:
                sums.add_clipped(name, t.numpy(), reference[name].numpy(), c, w)
    sums.divide(sum(WEIGHTS[:3]))
    # The torch path: Mean over NormBound.apply's clipped updates, renormalised over the kept weights.
    clipped = [u if c == 1.0 else {n: (reference[n] + (t - reference[n]) * c).to(t.dtype) for n, t in u.items()}
               for u, c in zip(updates, clips)]
    expected = {n: t / sum(WEIGHTS[:3]) for n, t in torch_weighted_mean(zip(clipped, WEIGHTS)).items()}

    assert all(bits(sums.tensors[n]) == bits(expected[n]) for n in expected)


def test_the_first_update_keeps_negative_zeros_as_torch_does():
    t = np.array([-0.0, 1.0], dtype=np.float32)
    sums = WeightedSum()

    sums.add("w", t, 0.5)

    assert np.signbit(sums.tensors["w"][0])


def test_a_sum_refuses_another_shape_or_dtype():
    sums = WeightedSum()
    sums.add("w", np.ones(3, np.float32), 0.5)

    with pytest.raises(FedloraError, match="tensor 'w' differs in shape or dtype"):
        sums.add("w", np.ones(4, np.float32), 0.5)
    with pytest.raises(FedloraError, match="tensor 'w' differs in shape or dtype"):
        sums.add("w", np.ones(3, np.float64), 0.5)


def test_squared_distance_is_the_same_with_or_without_buffers():
    update, reference = random_updates(torch.float32)[:2]

    for name in update:
        unbuffered = squared_distance(update[name].numpy(), reference[name].numpy())
        buffers = scratch_buffers({n: t.numpy() for n, t in reference.items()})
        by_array = squared_distance(update[name].numpy(), reference[name].numpy(), buffers)
        exact = float(((update[name].double() - reference[name].double()) ** 2).sum())
        assert unbuffered == by_array and unbuffered == pytest.approx(exact, rel=1e-5)
    assert aggregation.update_norm(arrays(update), arrays(reference)) == math.sqrt(
        sum(squared_distance(update[n].numpy(), reference[n].numpy()) for n in sorted(update)))


def test_squared_distance_is_finite_exactly_when_both_tensors_are():
    big = np.array([3e38, -1.0], dtype=np.float32)  # finite; the float32 difference from -big is not
    assert squared_distance(big, -big) == pytest.approx(4 * (3e38**2 + 1))
    for bad in (np.nan, np.inf, -np.inf):
        assert not math.isfinite(squared_distance(np.array([1.0, bad], dtype=np.float32), np.zeros(2, np.float32)))
    ones, zeros = (narrow(np.full(3, v, np.float32), "BF16") for v in (1.0, 0.0))  # bfloat16, as read
    assert squared_distance(ones, zeros) == 3.0 and as_array(ones).dtype == np.float32


def test_nonfinite_names_the_first_array_with_nan_or_inf():
    assert nonfinite({"w": np.array([1.0, np.nan], np.float32)}) == "w"
    assert nonfinite({"v": np.zeros(2), "w": np.array([-np.inf])}) == "w"
    # A sum that overflows is no NaN: checked element by element before a tensor is refused.
    assert nonfinite({"w": np.array([3e38, 3e38, -1.0], np.float32)}) is None
    assert nonfinite({"i": np.arange(3)}) is None
