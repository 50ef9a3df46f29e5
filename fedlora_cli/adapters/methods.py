"""Federated methods: what each side of an adapter does in a round, and the plan of one federation.

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

from dataclasses import dataclass

from fedlora_cli.adapters.kinds import AdapterKind, adapter_kind
from fedlora_cli.adapters.roles import ROLE_HEAD, ROLE_LABELS, SIDE_A, SIDE_B, role_of
from fedlora_cli.errors import FedloraError


@dataclass(frozen=True)
class Method:
    """A federated method: which sides of the adapter its clients train and which they send."""

    name: str  # the recipe's federation.method
    label: str  # what a person calls it
    trains: frozenset[str]  # sides
    sends: frozenset[str]  # sides
    summary: str
    explanation: str  # how it works, with its paper (model cards)

    @property
    def sends_both_factors(self) -> bool:
        """Whether every client sends A and B, so the coordinator can form the products B_k A_k (svd, exact)."""
        return self.sends == {SIDE_A, SIDE_B}


METHODS: dict[str, Method] = {
    "fedavg": Method(
        "fedavg", "FedAvg-LoRA", frozenset({SIDE_A, SIDE_B}), frozenset({SIDE_A, SIDE_B}), "FedAvg-LoRA: share A and B",
        "every client trains both LoRA matrices A and B; the coordinator averages A and B (FedIT, the baseline).",
    ),
    "ffa": Method(
        "ffa", "FFA-LoRA", frozenset({SIDE_B}), frozenset({SIDE_B}), "FFA-LoRA: freeze A, share B",
        "A stays frozen at its seeded random initialisation; clients train and send only B, which the coordinator "
        "averages (Sun et al., ICLR 2024, arXiv 2403.12313).",
    ),
    "fedsa": Method(
        "fedsa", "FedSA-LoRA", frozenset({SIDE_A, SIDE_B}), frozenset({SIDE_A}), "FedSA-LoRA: share A, keep B local",
        "clients train A and B but share only A, which the coordinator averages; each client keeps its own B "
        "(Guo et al., ICLR 2025, arXiv 2410.01463).",
    ),
}

# federation.head: what happens to the task head, and how a model card says it.
HEAD_POLICIES: dict[str, str] = {
    "shared": "trained by every client and averaged",
    "local": "trained by each client and kept at home",
    "frozen": "left at its seeded initialisation",
}
_HEAD_TRAINED = ("shared", "local")
_HEAD_SENT = ("shared",)


def method(name: str) -> Method:
    if name not in METHODS:
        raise FedloraError(f"unknown method {name!r} (known: {', '.join(METHODS)})")
    return METHODS[name]


@dataclass(frozen=True)
class Plan:
    """The roles of one federation (adapter kind, method and head policy)."""

    method: Method
    kind: AdapterKind
    trained: frozenset[str]
    sent: frozenset[str]

    @property
    def local(self) -> frozenset[str]:
        """Roles trained but never sent: the client's private state."""
        return self.trained - self.sent

    @property
    def frozen(self) -> frozenset[str]:
        """Roles nobody trains; they stay bit-identical to the round-0 global checkpoint."""
        return self.kind.roles - self.trained

    @property
    def global_is_model(self) -> bool:
        """Whether the global checkpoint alone is the federation's model. It is not when a trained role stays at
        home (FedSA's B, a local head): the global's copy of that role never moves, and each client's model is
        the global plus its own client state (what personalised evaluation scores)."""
        return not self.local

    def why_global_is_partial(self) -> str | None:
        """Why the global checkpoint alone is no model, in words for a table's note; None when it is one.

        Every kind starts its B side at zero (the adapter's update starts at zero), so a B side kept at home
        leaves the global adapter adding nothing to the base model.
        """
        if self.global_is_model:
            return None
        reasons = []
        if self.kind.side_b in self.local:
            b = ROLE_LABELS[self.kind.side_b]
            reasons.append(f"{self.method.label} keeps each client's {b} at home, so the global {b} stays 0 and "
                           "its adapter adds nothing to the base model")
        if ROLE_HEAD in self.local:
            reasons.append("each client keeps its own classifier head, so the global head stays at its seeded "
                           "initialisation")
        others = sorted(self.local - {self.kind.side_b, ROLE_HEAD})
        if others:
            reasons.append(f"each client keeps its own {', '.join(ROLE_LABELS[r] for r in others)} at home")
        return "; ".join(reasons)

    def trains(self, name: str) -> bool:
        return role_of(name) in self.trained

    def sends(self, name: str) -> bool:
        return role_of(name) in self.sent

    def keeps(self, name: str) -> bool:
        return role_of(name) in self.local


def plan(method_name: str, head: str, kind: str = "lora") -> Plan:
    m = method(method_name)
    k = adapter_kind(kind)
    trained = {k.role(side) for side in m.trains}
    sent = {k.role(side) for side in m.sends}
    if head not in HEAD_POLICIES:
        raise FedloraError(f"unknown head policy {head!r} (known: {', '.join(HEAD_POLICIES)})")
    if head in _HEAD_TRAINED:
        trained.add(ROLE_HEAD)
    if head in _HEAD_SENT:
        sent.add(ROLE_HEAD)
    return Plan(m, k, frozenset(trained), frozenset(sent))
