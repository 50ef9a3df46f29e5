"""Adapter kinds and federated methods: which adapter tensors each client trains, sends, and keeps at home.

Two separate axes. The *adapter kind* is PEFT's business (how the update to a weight is parameterised); the
*method* decides what happens to each part of it in a round. Every adapter tensor plays one role, read from
its PEFT name:

    ==============  ===============  ==============================================================
    role            adapter kinds    what it is
    ==============  ===============  ==============================================================
    lora_A          lora, rslora     the down-projection A (r x k), seeded kaiming-uniform init
    lora_B          lora, rslora     the up-projection B (d x r), initialised zero
    vera_lambda_d   vera             the r-vector scaling the shared A projection (init d_initial)
    vera_lambda_b   vera             the d-vector scaling the shared B projection (init zero)
    vera_projection vera             the shared random projections vera_A / vera_B: derived from the
                                     seed by every client, never trained, never sent
    head            all              the task head (PEFT modules_to_save copy of the classifier)
    ==============  ===============  ==============================================================

The kinds (``adapter.kind``)::

    lora     W0 + (alpha / r) B A                               Hu et al. 2021
    rslora   W0 + (alpha / sqrt(r)) B A                         Kalajdzievski 2023, arXiv 2312.03732 (rsLoRA)
    vera     W0 + diag(lambda_b) B_p diag(lambda_d) A_p         Kopiczko et al., ICLR 2024 (arXiv 2310.11454)

Each kind has an *A side* (lora_A, or VeRA's lambda_d) and a *B side* (lora_B, or lambda_b). A method maps
the two sides to what happens to them in a round:

    ========  ===========  =========  ==========================================================
    method    trained      sent       paper
    ========  ===========  =========  ==========================================================
    fedavg    A, B         A, B       FedIT / FedAvg-LoRA: the baseline, averages A and B apart
    ffa       B            B          Sun et al., "Improving LoRA in Privacy-preserving Federated
                                      Learning", ICLR 2024 (arXiv 2403.12313): A stays frozen at
                                      its seeded init, which halves the upload
    fedsa     A, B         A          Guo et al., "Selective Aggregation for Low-Rank Adaptation in
                                      Federated Learning", ICLR 2025 (arXiv 2410.01463): A carries
                                      general knowledge and is shared, B stays with its client
    ========  ===========  =========  ==========================================================

so FFA-VeRA freezes lambda_d and trains and shares lambda_b, and FedSA-VeRA shares lambda_d and keeps lambda_b
at home, as FedSA-LoRA's paper defines them. The head follows the recipe's head policy: ``shared`` (trained
and sent), ``local`` (trained, kept at home), ``frozen`` (neither). Whatever is trained but not sent is client
state: it never leaves the client's folder. Whatever nobody trains is *frozen*: its digest is recorded in the
round-0 global checkpoint and checked at every step (FFA's A, VeRA's projections, a frozen head).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedlora_cli.errors import FedloraError

ROLE_A = "lora_A"
ROLE_B = "lora_B"
ROLE_LAMBDA_D = "vera_lambda_d"
ROLE_LAMBDA_B = "vera_lambda_b"
ROLE_PROJECTION = "vera_projection"
ROLE_HEAD = "head"
ROLES = (ROLE_A, ROLE_B, ROLE_LAMBDA_D, ROLE_LAMBDA_B, ROLE_PROJECTION, ROLE_HEAD)

# The two sides of an adapter, in the methods' terms.
SIDE_A = "A"
SIDE_B = "B"

# Parts of a PEFT name that mark a tensor's role; VeRA's projections are model-level buffers vera_A / vera_B.
_NAME_PARTS = {ROLE_A: ROLE_A, ROLE_B: ROLE_B, ROLE_LAMBDA_D: ROLE_LAMBDA_D, ROLE_LAMBDA_B: ROLE_LAMBDA_B,
               "vera_A": ROLE_PROJECTION, "vera_B": ROLE_PROJECTION}
# Markers of a trainable adapter parameter in a PeftModel's named_parameters().
ADAPTER_PARAMETER_MARKERS = ("lora_A", "lora_B", "vera_lambda_", "modules_to_save")


def role_of(name: str) -> str:
    """The role of an adapter tensor, from its PEFT parameter or state-dict name."""
    for part in name.split("."):
        if part in _NAME_PARTS:
            return _NAME_PARTS[part]
    return ROLE_HEAD


@dataclass(frozen=True)
class AdapterKind:
    name: str
    side_a: str  # role of the A side
    side_b: str  # role of the B side
    fixed: frozenset[str]  # roles no method trains or sends
    summary: str

    @property
    def roles(self) -> frozenset[str]:
        return frozenset({self.side_a, self.side_b, ROLE_HEAD}) | self.fixed

    @property
    def has_factors(self) -> bool:
        """Whether the update is a product B A of two trained matrices (what svd and exact aggregation need)."""
        return self.side_a == ROLE_A

    def scale(self, alpha: float, r: int) -> float:
        """The factor PEFT multiplies B A by: alpha / r (LoRA) or alpha / sqrt(r) (rsLoRA)."""
        if not self.has_factors:
            raise FedloraError(f"adapter kind '{self.name}' has no LoRA scale")
        return alpha / math.sqrt(r) if self.name == "rslora" else alpha / r

    def role(self, side: str) -> str:
        return self.side_a if side == SIDE_A else self.side_b


ADAPTER_KINDS = {
    "lora": AdapterKind("lora", ROLE_A, ROLE_B, frozenset(), "LoRA: W0 + alpha/r B A"),
    "rslora": AdapterKind("rslora", ROLE_A, ROLE_B, frozenset(), "rank-stabilised LoRA: W0 + alpha/sqrt(r) B A"),
    "vera": AdapterKind(
        "vera", ROLE_LAMBDA_D, ROLE_LAMBDA_B, frozenset({ROLE_PROJECTION}),
        "VeRA: shared random projections scaled by trained vectors lambda_d, lambda_b",
    ),
}

# What a person calls each role (model cards, messages).
ROLE_LABELS = {ROLE_A: "A", ROLE_B: "B", ROLE_LAMBDA_D: "lambda_d", ROLE_LAMBDA_B: "lambda_b",
               ROLE_PROJECTION: "VeRA projections", ROLE_HEAD: "classifier head"}


def adapter_kind(name: str) -> AdapterKind:
    if name not in ADAPTER_KINDS:
        raise FedloraError(f"unknown adapter kind '{name}' (known: {', '.join(ADAPTER_KINDS)})")
    return ADAPTER_KINDS[name]


@dataclass(frozen=True)
class Method:
    name: str
    trains: frozenset[str]  # sides
    sends: frozenset[str]  # sides
    summary: str


METHODS = {
    "fedavg": Method("fedavg", frozenset({SIDE_A, SIDE_B}), frozenset({SIDE_A, SIDE_B}), "FedAvg-LoRA: share A and B"),
    "ffa": Method("ffa", frozenset({SIDE_B}), frozenset({SIDE_B}), "FFA-LoRA: freeze A, share B"),
    "fedsa": Method("fedsa", frozenset({SIDE_A, SIDE_B}), frozenset({SIDE_A}), "FedSA-LoRA: share A, keep B local"),
}


@dataclass(frozen=True)
class Plan:
    """The roles of one federation (adapter kind, method and head policy)."""

    method: str
    trained: frozenset[str]
    sent: frozenset[str]
    kind: str = "lora"

    @property
    def local(self) -> frozenset[str]:
        """Roles trained but never sent: the client's private state."""
        return self.trained - self.sent

    @property
    def frozen(self) -> frozenset[str]:
        """Roles nobody trains; they stay bit-identical to the round-0 global checkpoint."""
        return ADAPTER_KINDS[self.kind].roles - self.trained

    def trains(self, name: str) -> bool:
        return role_of(name) in self.trained

    def sends(self, name: str) -> bool:
        return role_of(name) in self.sent

    def keeps(self, name: str) -> bool:
        return role_of(name) in self.local


def plan(method: str, head: str, kind: str = "lora") -> Plan:
    if method not in METHODS:
        raise FedloraError(f"unknown method '{method}' (known: {', '.join(METHODS)})")
    k = adapter_kind(kind)
    m = METHODS[method]
    trained = {k.role(side) for side in m.trains}
    sent = {k.role(side) for side in m.sends}
    if head in ("shared", "local"):
        trained.add(ROLE_HEAD)
    if head == "shared":
        sent.add(ROLE_HEAD)
    elif head not in ("local", "frozen"):
        raise FedloraError(f"unknown head policy '{head}' (known: shared, local, frozen)")
    return Plan(method, frozenset(trained), frozenset(sent), kind)
