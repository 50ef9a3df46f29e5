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


def fewest(federation: Any) -> int:
    """The fewest client updates a round aggregates: ``federation.min_clients``, and under secure aggregation at
    least its ``reconstruction_threshold`` (SecAgg+ sums no fewer sites: a seeded sample below it would halt the
    protocol at every try)."""
    s = federation.secure_aggregation
    return federation.min_clients if s is None else max(federation.min_clients, s.reconstruction_threshold)


def fewest_named(federation: Any) -> str:
    """The rule :func:`fewest` applies, as a message names it."""
    least = fewest(federation)
    if least == federation.min_clients:
        return f"federation.min_clients = {least}"
    return (f"federation.secure_aggregation.reconstruction_threshold = {least} (SecAgg+ sums no fewer sites; "
            f"federation.min_clients is {federation.min_clients})")


def needed(federation: Any, asked: int, private: bool) -> int | None:
    """How many client updates a round needs when its sample asked ``asked`` clients: :func:`fewest`.

    A Poisson sample can ask fewer, even none, and since it is fixed by the seed and the round, waiting cannot
    help: such a short round is what the literature makes of it. Under DP-FedAvg (``private``) the round releases
    what the clients it asked send (McMahan et al. 2018: the sum over the sample divided by the fixed expected
    count q N, whatever the sample's size), all of them needed; an empty sample (0) is a noise-only release, which
    the accountant counts. (Recipe validation refuses a Poisson sample under DP-FedAvg with secure aggregation: a
    sample too small for SecAgg+ to sum has no exact release.) Otherwise None: the round is skipped, its global
    checkpoint the previous one carried forward and recorded as skipped.
    """
    least = fewest(federation)
    if asked >= least:
        return least
    return asked if private else None


def require_enough(federation: Any, round_: int, count: int, asked: int | None = None, *, stage: str,
                   need: int | None = None) -> None:
    """Refuse a round with fewer than ``need`` (default :func:`fewest`; see :func:`needed`) clients at
    ``stage``: 'reachable' (asked clients online or done), 'collected' (updates that came back), 'given' (the
    updates handed to ``fedlora aggregate``)."""
    need = fewest(federation) if need is None else need
    if count >= need:
        return
    short = _SHORT_OF[stage].format(count=count, asked=asked)
    rule = fewest_named(federation) if need == fewest(federation) else \
        f"the {need} client(s) this round's sample asked (fewer than federation.min_clients, so all of them)"
    raise FedloraError(f"round {round_}: {short}, fewer than {rule}; nothing written")


def not_asked(federation: Any, seed: int, round_: int, client_id: str, private: bool = False) -> str | None:
    """Why ``client_id`` has no part in round ``round_`` (to follow "which ..."), or None: a client outside the
    federation's population, or, when the federation samples its clients, one the round's sample left out or a
    round the sample skips (:func:`needed`; ``private``: under DP-FedAvg, which skips none)."""
    if client_id not in population(federation):
        return f"is not one of the federation's clients ({_population_named(federation)})"
    if federation.clients_per_round is None:
        return None
    sample = asked(federation, seed, round_)
    if client_id not in sample:
        return f"round {round_} did not ask (see 'fedlora sample')"
    if needed(federation, len(sample), private) is None:
        return f"round {round_} skips (its sample asked fewer than {fewest_named(federation)}; see 'fedlora sample')"
    return None


def _population_named(federation: Any) -> str:
    if federation.client_ids:
        return "federation.client_ids"
    n = federation.clients
    return f"federation.clients = {n} without client_ids: client-0" + ("" if n == 1 else f"..client-{n - 1}")


def require_asked(federation: Any, seed: int, round_: int, client_id: str, where: Any) -> None:
    """Refuse a client update (at ``where``) from a client outside the federation, or that the round did not ask."""
    why = not_asked(federation, seed, round_, client_id)
    if why is not None:
        raise FedloraError(f"client update {where} is from client '{client_id}', which {why}; nothing written")
