"""The norm bound: a screen in front of any strategy that limits how far one client can move the global.

Each client update's difference from the tensors it received is measured (L2 over all its tensors); beyond
``federation.norm_bound`` it is scaled down to the bound ('clip') or left out of the round ('reject').
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedlora_cli.aggregation.functions import clip_to_norm, update_norm

if TYPE_CHECKING:
    import numpy as np

ACTIONS = ("clip", "reject")
CLIPPED, REJECTED = "clipped", "rejected"


@dataclass(frozen=True)
class Verdict:
    norm: float  # of the update's difference from what the client received
    bound: str | None  # None (within the bound), 'clipped' or 'rejected'
    clip: float  # the scale applied to the difference (1: untouched)


@dataclass(frozen=True)
class NormBound:
    bound: float | None  # None: no bound, every update passes
    action: str = "clip"

    def judge(self, tensors: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> Verdict:
        return self.verdict(update_norm(tensors, reference))

    def verdict(self, norm: float) -> Verdict:
        """The verdict on an update whose difference from what its client received has this L2 norm."""
        if self.bound is None or not norm > self.bound:
            return Verdict(norm, None, 1.0)
        if self.action == "reject":
            return Verdict(norm, REJECTED, 0.0)
        return Verdict(norm, CLIPPED, self.bound / norm)

    def apply(self, tensors: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray],
              verdict: Verdict) -> Mapping[str, np.ndarray]:
        """The update as the strategy receives it: clipped to the bound where the verdict says so."""
        return tensors if verdict.bound != CLIPPED else clip_to_norm(tensors, reference, self.bound)

    def describe(self) -> dict[str, object]:
        return {"norm_bound": self.bound, "norm_bound_action": self.action if self.bound is not None else None}
