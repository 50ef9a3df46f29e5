"""DP-SGD at a client (Abadi et al. 2016, with Opacus): per-example clipping, Gaussian noise, Poisson sampling."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


class DPSGD:
    """Opacus' per-example gradients and noisy clipped optimizer around a model, removable after a round."""

    def __init__(self, model: Any, optimizer: Any, noise_multiplier: float, max_grad_norm: float, expected_batch: int,
                 seed: int, device: str = "cpu") -> None:
        import torch

        from fedlora_cli.privacy.opacus_import import load

        GradSampleModule = load("opacus").GradSampleModule
        DPOptimizer = load("opacus.optimizers").DPOptimizer

        # Opacus records activations only in train mode; a model fresh from from_pretrained is in eval mode
        # and would fail with "No activations detected".
        model.train()
        self.module = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=True)
        # The noise is drawn where the gradients are.
        generator = torch.Generator(device=device).manual_seed(seed)
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
