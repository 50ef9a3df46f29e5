"""Federated methods: which adapter tensors each client trains, sends, and keeps at home.

Every tensor of the adapter plays one role, read from its PEFT name:

    lora_A   the down-projection A (r x k), initialised random (kaiming-uniform) from the recipe seed
    lora_B   the up-projection B (d x r), initialised zero
    head     the task head (PEFT modules_to_save copy of the classifier)

A method maps roles to what happens to them in a round:

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

The head follows the recipe's head policy: ``shared`` (trained and sent), ``local`` (trained, kept at home),
``frozen`` (neither). Whatever is trained but not sent is client state: it never leaves the client's folder.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedlora_cli.errors import FedloraError

ROLE_A = "lora_A"
ROLE_B = "lora_B"
ROLE_HEAD = "head"
ROLES = (ROLE_A, ROLE_B, ROLE_HEAD)


def role_of(name: str) -> str:
    """The role of an adapter tensor, from its PEFT parameter or state-dict name."""
    parts = name.split(".")
    if ROLE_A in parts:
        return ROLE_A
    if ROLE_B in parts:
        return ROLE_B
    return ROLE_HEAD


@dataclass(frozen=True)
class Method:
    name: str
    trains: frozenset[str]
    sends: frozenset[str]
    summary: str


METHODS = {
    "fedavg": Method("fedavg", frozenset({ROLE_A, ROLE_B}), frozenset({ROLE_A, ROLE_B}), "FedAvg-LoRA: share A and B"),
    "ffa": Method("ffa", frozenset({ROLE_B}), frozenset({ROLE_B}), "FFA-LoRA: freeze A, share B"),
    "fedsa": Method("fedsa", frozenset({ROLE_A, ROLE_B}), frozenset({ROLE_A}), "FedSA-LoRA: share A, keep B local"),
}


@dataclass(frozen=True)
class Plan:
    """The roles of one federation (method plus head policy)."""

    method: str
    trained: frozenset[str]
    sent: frozenset[str]

    @property
    def local(self) -> frozenset[str]:
        """Roles trained but never sent: the client's private state."""
        return self.trained - self.sent

    @property
    def frozen(self) -> frozenset[str]:
        """Roles nobody trains; they stay bit-identical to the round-0 global checkpoint."""
        return frozenset(ROLES) - self.trained

    def trains(self, name: str) -> bool:
        return role_of(name) in self.trained

    def sends(self, name: str) -> bool:
        return role_of(name) in self.sent

    def keeps(self, name: str) -> bool:
        return role_of(name) in self.local


def plan(method: str, head: str) -> Plan:
    if method not in METHODS:
        raise FedloraError(f"unknown method '{method}' (known: {', '.join(METHODS)})")
    m = METHODS[method]
    trained, sent = set(m.trains), set(m.sends)
    if head in ("shared", "local"):
        trained.add(ROLE_HEAD)
    if head == "shared":
        sent.add(ROLE_HEAD)
    elif head not in ("local", "frozen"):
        raise FedloraError(f"unknown head policy '{head}' (known: shared, local, frozen)")
    return Plan(method, frozenset(trained), frozenset(sent))
