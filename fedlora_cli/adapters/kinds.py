"""Adapter kinds: how the update to a weight is parameterised, and everything that follows from it.

The kinds (``adapter.kind``)::

    lora     W0 + (alpha / r) B A                               Hu et al. 2021
    rslora   W0 + (alpha / sqrt(r)) B A                         Kalajdzievski 2023, arXiv 2312.03732 (rsLoRA)
    vera     W0 + diag(lambda_b) B_p diag(lambda_d) A_p         Kopiczko et al., ICLR 2024 (arXiv 2310.11454)

An :class:`AdapterKind` answers what depends on the kind: its scale, its PEFT config, which roles form its A and
B sides, which axis of each tensor holds the rank, how tensor names map to adapted layers, and its label.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from fedlora_cli.adapters.roles import (
    ROLE_A, ROLE_B, ROLE_HEAD, ROLE_LAMBDA_B, ROLE_LAMBDA_D, ROLE_PROJECTION, SIDE_A, role_of,
)
from fedlora_cli.errors import FedloraError
from fedlora_cli.text import fmt


@dataclass(frozen=True)
class AdapterKind:
    """What an adapter kind decides. Subclasses: :class:`LoRA`, :class:`RsLoRA`, :class:`VeRA`."""

    name: str  # the recipe's adapter.kind
    label: str  # what a person calls it
    side_a: str  # role of the A side
    side_b: str  # role of the B side
    fixed: frozenset[str]  # roles no method trains or sends
    summary: str
    # Whether Opacus computes per-example gradients for this kind's trained tensors (what DP-SGD needs).
    per_example_gradients: bool = True

    @property
    def roles(self) -> frozenset[str]:
        return frozenset({self.side_a, self.side_b, ROLE_HEAD}) | self.fixed

    @property
    def has_factors(self) -> bool:
        """Whether the update is a product B A of two trained matrices (what svd and exact aggregation need)."""
        return False

    def role(self, side: str) -> str:
        return self.side_a if side == SIDE_A else self.side_b

    def scale(self, alpha: float, r: int) -> float:
        """The factor PEFT multiplies B A by."""
        raise FedloraError(f"adapter kind '{self.name}' has no LoRA scale")

    def rank_axis(self, role: str) -> int | None:
        """The axis of a tensor of ``role`` that has the rank's length (None: its shape does not follow the rank)."""
        return None

    def layers(self, names: Iterable[str]) -> dict[str, tuple[str, str]]:
        """Adapted layer -> (its A tensor name, its B tensor name); only kinds with factors have them."""
        raise FedloraError(f"adapter kind '{self.name}' has no A and B factors")

    def peft_config(self, adapter: Any, rank: int, task_type: str, seed: int) -> Any:
        """The PEFT config of ``adapter`` (a recipe's adapter section) at ``rank``, seeded by ``seed``."""
        raise NotImplementedError

    def describe(self, adapter: Mapping[str, Any]) -> str:
        """One line for the model card, from a recipe's adapter section as a dict."""
        raise NotImplementedError


@dataclass(frozen=True)
class LoRA(AdapterKind):
    """W0 + (alpha / r) B A (Hu et al. 2021); A (r x k) seeded kaiming-uniform, B (d x r) zero."""

    @property
    def has_factors(self) -> bool:
        return True

    def scale(self, alpha: float, r: int) -> float:
        return alpha / r

    def rank_axis(self, role: str) -> int | None:
        return {ROLE_A: 0, ROLE_B: 1}.get(role)

    def layers(self, names: Iterable[str]) -> dict[str, tuple[str, str]]:
        """The layer name is the PEFT module path, e.g. ``base_model.model.bert.encoder.layer.0.attention.self.query``."""
        a_names: dict[str, str] = {}
        b_names: dict[str, str] = {}
        for name in names:
            role = role_of(name)
            if role not in (ROLE_A, ROLE_B):
                continue
            parts = name.split(".")
            layer = ".".join(parts[: parts.index(role)])
            (a_names if role == ROLE_A else b_names)[layer] = name
        if set(a_names) != set(b_names):
            odd = sorted(set(a_names) ^ set(b_names))[0]
            raise FedloraError(f"layer '{odd}' lacks its lora_A or lora_B tensor")
        return {layer: (a_names[layer], b_names[layer]) for layer in sorted(a_names)}

    def peft_config(self, adapter: Any, rank: int, task_type: str, seed: int) -> Any:
        from peft import LoraConfig

        return LoraConfig(
            r=rank,
            lora_alpha=adapter.alpha,
            lora_dropout=adapter.dropout,
            target_modules=list(adapter.target_modules),
            use_rslora=self.rank_stabilised,
            task_type=task_type,
        )

    @property
    def rank_stabilised(self) -> bool:
        return False

    def describe(self, adapter: Mapping[str, Any]) -> str:
        ranks = adapter.get("client_ranks") or {}
        hetero = f" (client ranks {', '.join(f'{c}: {r}' for c, r in ranks.items())})" if ranks else ""
        return (
            f"{self.label} r={adapter['r']}{hetero}, alpha={fmt(adapter['alpha'], 1)}, "
            f"dropout={fmt(adapter['dropout'], 2)}, target modules {', '.join(adapter['target_modules'])}"
        )


@dataclass(frozen=True)
class RsLoRA(LoRA):
    """W0 + (alpha / sqrt(r)) B A: rank-stabilised LoRA (Kalajdzievski 2023, arXiv 2312.03732)."""

    def scale(self, alpha: float, r: int) -> float:
        return alpha / math.sqrt(r)

    @property
    def rank_stabilised(self) -> bool:
        return True


@dataclass(frozen=True)
class VeRA(AdapterKind):
    """W0 + diag(lambda_b) B_p diag(lambda_d) A_p (Kopiczko et al., ICLR 2024, arXiv 2310.11454).

    The projections A_p, B_p are derived from the seed (PEFT's ``projection_prng_key``) and saved with the
    adapter (``save_projection``), so a global checkpoint loads in vanilla PEFT on any machine.
    """

    def peft_config(self, adapter: Any, rank: int, task_type: str, seed: int) -> Any:
        from peft import VeraConfig

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return VeraConfig(
                r=rank,
                target_modules=list(adapter.target_modules),
                projection_prng_key=seed,
                save_projection=True,
                vera_dropout=adapter.dropout,
                d_initial=adapter.vera_d_initial,
                task_type=task_type,
            )

    def describe(self, adapter: Mapping[str, Any]) -> str:
        return (
            f"{self.label} r={adapter['r']}, dropout={fmt(adapter['dropout'], 2)}, "
            f"target modules {', '.join(adapter['target_modules'])}"
        )


ADAPTER_KINDS: dict[str, AdapterKind] = {
    "lora": LoRA("lora", "LoRA", ROLE_A, ROLE_B, frozenset(), "LoRA: W0 + alpha/r B A"),
    "rslora": RsLoRA("rslora", "rsLoRA", ROLE_A, ROLE_B, frozenset(), "rank-stabilised LoRA: W0 + alpha/sqrt(r) B A"),
    "vera": VeRA(
        "vera", "VeRA", ROLE_LAMBDA_D, ROLE_LAMBDA_B, frozenset({ROLE_PROJECTION}),
        "VeRA: shared random projections scaled by trained vectors lambda_d, lambda_b",
        per_example_gradients=False,
    ),
}


def adapter_kind(name: str) -> AdapterKind:
    if name not in ADAPTER_KINDS:
        raise FedloraError(f"unknown adapter kind {name!r} (known: {', '.join(ADAPTER_KINDS)})")
    return ADAPTER_KINDS[name]
