"""fedlora_cli.aggregation.norm_bound: the screen in front of every strategy: its verdicts and what it hands on."""

from __future__ import annotations

import numpy as np
import pytest

from fedlora_cli.aggregation import NormBound, update_norm
from fedlora_cli.aggregation.norm_bound import ACTIONS, CLIPPED, REJECTED, Verdict



def tensor(values) -> np.ndarray:
    return np.array(values, dtype=np.float32)


REFERENCE = {"w": tensor([1.0, 1.0]), "v": tensor([2.0])}
UPDATE = {"w": tensor([4.0, 5.0]), "v": tensor([2.0])}  # difference (3, 4, 0): norm 5


def test_an_update_within_the_bound_passes_untouched():
    bound = NormBound(10.0)
    verdict = bound.judge(UPDATE, REFERENCE)
    assert verdict == Verdict(norm=5.0, bound=None, clip=1.0)
    assert bound.apply(UPDATE, REFERENCE, verdict) is UPDATE


def test_an_update_exactly_at_the_bound_is_within_it():
    assert NormBound(5.0).judge(UPDATE, REFERENCE) == Verdict(5.0, None, 1.0)
    assert NormBound(5.0, "reject").judge(UPDATE, REFERENCE).bound is None


def test_clip_scales_the_difference_to_the_bound():
    bound = NormBound(2.0)
    verdict = bound.judge(UPDATE, REFERENCE)
    assert verdict.bound == CLIPPED == "clipped"
    assert verdict.norm == pytest.approx(5.0)
    assert verdict.clip == pytest.approx(2.0 / 5.0)  # bound / norm
    kept = bound.apply(UPDATE, REFERENCE, verdict)
    np.testing.assert_allclose(kept["w"], tensor([1.0 + 3 * 0.4, 1.0 + 4 * 0.4]), rtol=1.3e-6)
    np.testing.assert_array_equal(kept["v"], REFERENCE["v"])
    assert kept["w"].dtype == np.float32
    assert update_norm(kept, REFERENCE) == pytest.approx(2.0)


def test_reject_leaves_the_update_out():
    bound = NormBound(2.0, "reject")
    verdict = bound.judge(UPDATE, REFERENCE)
    assert verdict == Verdict(pytest.approx(5.0), REJECTED, 0.0)
    assert verdict.bound == "rejected"
    # What a rejected update would be handed on as does not matter: the strategy never receives it.
    assert bound.apply(UPDATE, REFERENCE, verdict) is UPDATE


def test_the_norm_is_over_all_tensors_together():
    # 3 in one tensor and 4 in another: 5 together, so a bound of 4.5 clips though neither tensor alone exceeds it.
    update = {"a": tensor([3.0]), "b": tensor([4.0])}
    zero = {"a": tensor([0.0]), "b": tensor([0.0])}
    verdict = NormBound(4.5).judge(update, zero)
    assert verdict.bound == CLIPPED and verdict.clip == pytest.approx(0.9)


def test_no_bound_passes_everything_and_describes_itself():
    huge = {"w": tensor([1e30, 1e30]), "v": tensor([2.0])}
    assert NormBound(None).judge(huge, REFERENCE).bound is None
    assert NormBound(None, "reject").describe() == {"norm_bound": None, "norm_bound_action": None}
    assert NormBound(3.0, "reject").describe() == {"norm_bound": 3.0, "norm_bound_action": "reject"}
    assert NormBound(3.0).describe() == {"norm_bound": 3.0, "norm_bound_action": "clip"}
    assert ACTIONS == ("clip", "reject")


@pytest.mark.parametrize("bound", [NormBound(None), NormBound(10.0), NormBound(2.0), NormBound(2.0, "reject")])
def test_a_verdict_on_a_norm_is_the_verdict_on_the_tensors(bound):
    # What the numpy round, which measures the norm itself, asks of the bound.
    assert bound.verdict(update_norm(UPDATE, REFERENCE)) == bound.judge(UPDATE, REFERENCE)
