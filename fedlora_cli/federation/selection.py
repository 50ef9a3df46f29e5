"""Which round of a run to keep: ``fedlora export --round best`` takes the round whose model scored best on the
validation split, so the test split stays a clean estimate of the model exported.

The scores are those each round wrote to ``RUN/metrics/round-NNN.json`` under ``validation`` (simulate and the
Flower server app write them when the coordinator holds validation data): the global model's, or for one client
its personalised model's. A score is the accuracy (a causal LM's exact match), else the negated loss.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlora_cli.errors import FedloraError
from fedlora_cli.storage.checkpoints import latest_state
from fedlora_cli.storage.files import read_json
from fedlora_cli.storage.run_layout import GLOBAL_DIR, RunLayout

BEST, LAST = "best", "last"


@dataclass(frozen=True)
class ChosenRound:
    """The global checkpoint a ``--round`` names, and (``best``) the validation score that chose it."""

    path: Path
    round: int
    score: float | None = None
    metric: str | None = None  # what the score is: 'accuracy', 'exact_match' or 'loss'


def state_client(state_dir: Path) -> str | None:
    """The client a state folder belongs to (its newest state says), or None when it holds no state yet."""
    if not Path(state_dir).is_dir():
        return None
    kept = latest_state(Path(state_dir))
    return kept.manifest.client_id if kept is not None else None


def run_of(path: Path) -> RunLayout:
    """The run folder ``path`` is, or holds the global checkpoint ``path``; FedloraError for anything else."""
    path = Path(path)
    if (path / GLOBAL_DIR).is_dir():
        return RunLayout(path)
    layout = RunLayout.of_global(path)
    if layout is None:
        raise FedloraError(f"--round needs a run folder (or one of its global checkpoints); {path} is neither")
    return layout


def choose_round(path: Path, which: str, client_id: str | None = None, state_dir: Path | None = None) -> ChosenRound:
    """The global checkpoint of the run at ``path`` that ``which`` names: ``best`` (the highest validation score of
    the global model, or of ``client_id``'s personalised model, by default the client whose state folder
    ``state_dir`` is; ties go to the earlier round), ``last``, or a round number."""
    if client_id is None and state_dir is not None:
        client_id = state_client(state_dir)
    layout = run_of(path)
    rounds = {int(p.name[6:]): p for p in layout.global_checkpoints()}
    if not rounds:
        raise FedloraError(f"{layout.root} holds no global checkpoint")
    if which == LAST:
        last = max(rounds)
        return ChosenRound(rounds[last], last)
    if which != BEST:
        if not which.isdigit():
            raise FedloraError(f"--round must be 'best', 'last' or a round number; got '{which}'")
        if int(which) not in rounds:
            raise FedloraError(f"{layout.root} has no global checkpoint of round {int(which)} (rounds 0-{max(rounds)})")
        return ChosenRound(rounds[int(which)], int(which))
    scored = []
    for round_ in sorted(rounds):
        metrics = layout.metrics(round_)
        found = _validation_score(read_json(metrics, "round metrics"), client_id) if metrics.is_file() else None
        if found is not None:
            scored.append((round_, *found))
    if not scored:
        who = f"client '{client_id}'s personalised model" if client_id else "the global model"
        raise FedloraError(f"no round of {layout.root} has a validation score of {who} (RUN/metrics, 'validation'): "
                           "partition with a validation fraction, or give --round N")
    metric = scored[0][2]
    best = max((r for r in scored if r[2] == metric), key=lambda r: (r[1], -r[0]))
    return ChosenRound(rounds[best[0]], best[0], best[1] if metric != "loss" else -best[1], metric)


def _validation_score(metrics: Mapping[str, Any], client_id: str | None) -> tuple[float, str] | None:
    """(score, metric) of the round's validation scores; higher is better (a loss is negated)."""
    validation = metrics.get("validation")
    if not isinstance(validation, dict):
        return None
    found = (validation.get("personalised") or {}).get(client_id) if client_id else validation.get("global")
    if not isinstance(found, dict):
        return None
    for metric in ("accuracy", "exact_match"):
        if isinstance(found.get(metric), (int, float)):
            return float(found[metric]), metric
    loss = found.get("loss")
    return (-float(loss), "loss") if isinstance(loss, (int, float)) else None
