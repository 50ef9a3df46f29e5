"""Which clients a round asks (every client, a fixed-size sample, or a Poisson sample) and how many must answer.

The draw is seeded by ``training.seed`` and the round, so the coordinator, a simulation and anyone checking a
global checkpoint get the same clients, and each global checkpoint records who was asked (``asked``) beside
who answered (``clients``). The sample is therefore public, and DP-FedAvg claims no amplification by sampling
for it (:func:`fedlora_cli.privacy.server_epsilon`). Under DP-FedAvg the sample must be Poisson (each client
independently with rate q = clients_per_round / clients), whose expected size q N is the release's fixed
denominator; recipe validation refuses a fixed-size sample there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fedlora_cli.errors import FedloraError

POISSON = "poisson"


def population(federation: Any) -> list[str]:
    """Every client of the federation: ``federation.client_ids``, or the ids ``fedlora partition`` writes."""
    from fedlora_cli.data.partition import client_ids

    return list(federation.client_ids) if federation.client_ids else client_ids(federation.clients)


def sample_rate(federation: Any) -> float:
    """The chance a client is asked in a round (1 when every client is)."""
    if federation.clients_per_round is None:
        return 1.0
    return federation.clients_per_round / federation.clients


def asked(federation: Any, seed: int, round_: int) -> list[str]:
    """The clients asked to train round ``round_``, in population order."""
    import numpy as np

    clients = population(federation)
    k = federation.clients_per_round
    if k is None or (k >= len(clients) and federation.sampling != POISSON):
        return clients
    rng = np.random.default_rng([seed, round_, 0x5A3])  # one stream per round, apart from training's seeds
    if federation.sampling == POISSON:
        chosen: Sequence[int] = np.flatnonzero(rng.random(len(clients)) < sample_rate(federation))
    else:
        chosen = np.sort(rng.choice(len(clients), size=k, replace=False))
    return [clients[i] for i in chosen]


# The participation rule, at each stage of a round where it can fail: what a message says of the count.
_SHORT_OF = {
    "reachable": "{count} of the {asked} client(s) asked are online or done",
    "collected": "{count} client update(s) of {asked} asked",
    "given": "{count} client update(s)",
}


def require_enough(federation: Any, round_: int, count: int, asked: int | None = None, *, stage: str) -> None:
    """Refuse a round with fewer than ``federation.min_clients`` clients at ``stage``: 'asked' (the round's
    sample), 'reachable' (asked clients online or done), 'collected' (updates that came back), 'given' (the
    updates handed to ``fedlora aggregate``)."""
    need = federation.min_clients
    if count >= need:
        return
    if stage == "asked":
        how = "Poisson sampling" if federation.sampling == POISSON else "the round's sample"
        raise FedloraError(
            f"round {round_}: {how} asked {count} client(s), fewer than federation.min_clients = {need}; lower "
            "min_clients or raise clients_per_round"
        )
    short = _SHORT_OF[stage].format(count=count, asked=asked)
    raise FedloraError(f"round {round_}: {short}, fewer than federation.min_clients = {need}; nothing written")


def not_asked(federation: Any, seed: int, round_: int, client_id: str) -> str | None:
    """Why ``client_id`` has no part in round ``round_`` (to follow "which ..."), or None: when the federation
    samples its clients, a client the round's sample left out."""
    if federation.clients_per_round is not None and client_id not in asked(federation, seed, round_):
        return f"round {round_} did not ask (see 'fedlora sample')"
    return None


def require_asked(federation: Any, seed: int, round_: int, client_id: str, where: Any) -> None:
    """Refuse a client update (at ``where``) from a client the round did not ask, when the federation samples."""
    why = not_asked(federation, seed, round_, client_id)
    if why is not None:
        raise FedloraError(f"client update {where} is from client '{client_id}', which {why}; nothing written")
