"""What each command logs, as flat tracker metrics (keys ``round/...`` by round, ``step/<client>/...`` by the
client's training step; see :class:`~fedlora_cli.tracking.base.Tracker`).

The names are those of ``--json``: ``round/global_accuracy`` is the ``global_accuracy`` of the round's row,
so a tracker's curve and the JSON a script reads agree.

Under DP-SGD a client's training loss is a function of its data with no noise: it stays on that client. A client
logs its own (``train-client``, into its own state folder); the coordinator never does, and neither does
``simulate``, whose trackers are the coordinator's view of the federation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

# A round's row (fedlora_cli.federation.rounds.round_row, simulate's and the Flower server app's): the keys logged
# as round/<key> (those of --json).
ROUND_KEYS = (
    "clients", "train_loss", "global_loss", "global_accuracy", "global_macro_f1", "personalised_loss",
    "personalised_accuracy", "personalised_accuracy_own_mix", "sites_accuracy", "upload_bytes", "upload_bytes_per_client", "wire_bytes",
    "seconds", "wall_seconds", "epsilon", "server_epsilon", "clamped_values", "clipped_sites",
    "counted_sites",
    # The validation split's scores (fedlora_cli.federation.rounds.VALIDATION_SCORES).
    "validation_global_accuracy", "validation_global_macro_f1", "validation_global_loss",
    "validation_personalised_accuracy", "validation_personalised_accuracy_own_mix", "validation_sites_accuracy",
)
TRAIN_LOSS = "train_loss"


def _present(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {key: float(value) for key, value in metrics.items() if value is not None}


def round_metrics(row: Mapping[str, Any], private: bool) -> dict[str, float]:
    """A round's row; under DP-SGD without the clients' training loss."""
    return _present({f"round/{key}": row.get(key) for key in ROUND_KEYS if not (private and key == TRAIN_LOSS)})


def step_key(client_id: str) -> str:
    """The key of a client's training loss per step."""
    return f"step/{client_id}/{TRAIN_LOSS}"


def step_logger(
    log: Callable[[int, Mapping[str, float]], None], client_id: str, round_: int,
    progress: Callable[[int, int, float], None] | None = None,
) -> Callable[[int, int, float], None]:
    """A training progress callback that also logs the step's loss; the step counts across rounds (a client
    runs the same number of steps every round), so a resumed run's curve continues where it stopped."""
    key = step_key(client_id)

    def callback(done: int, total: int, loss: float) -> None:
        if progress is not None:
            progress(done, total, loss)
        if not math.isnan(loss):  # an empty Poisson sample under DP-SGD has no loss
            log((round_ - 1) * total + done, {key: loss})

    return callback


def client_round_metrics(update: Any, local_loss: float | None) -> dict[str, float]:
    """train-client: one client's round as that client saw it (its update manifest and its own loss)."""
    cid = update.client_id
    privacy = update.privacy or {}
    return _present({
        f"round/{cid}/{TRAIN_LOSS}": local_loss, f"round/{cid}/upload_bytes": update.bytes,
        f"round/{cid}/examples": update.num_examples, f"round/{cid}/steps": update.steps,
        f"round/{cid}/seconds": update.seconds, f"round/{cid}/epsilon": privacy.get("epsilon"),
    })


def aggregate_metrics(result: Any) -> dict[str, float]:
    """aggregate: the round's client updates as the coordinator received them (no training loss from a DP-SGD
    client: its update does not carry one), and the DP-FedAvg epsilon spent."""
    metrics: dict[str, Any] = {
        "round/upload_bytes": sum(c.bytes for c in result.clients), "round/clients": len(result.clients),
        "round/server_epsilon": result.server_epsilon,
    }
    for c in result.clients:
        metrics.update({
            f"round/{c.client_id}/weight": c.weight, f"round/{c.client_id}/update_norm": c.update_norm,
            f"round/{c.client_id}/upload_bytes": c.bytes, f"round/{c.client_id}/{TRAIN_LOSS}": c.loss,
        })
    return _present(metrics)


def evaluation_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """evaluate: the global model's scores, or one client's personalised ones, under simulate's names
    (``global_accuracy`` is exact match for a causal LM, as in simulate's rows; ``prefix`` 'validation_' for the
    validation split's, as ``validation_global_accuracy``)."""
    who = prefix + ("personalised" if metrics.get("personalised") else "global")
    accuracy = metrics["accuracy"] if "accuracy" in metrics else metrics.get("exact_match")
    logged = {
        f"round/{who}_accuracy": accuracy, f"round/{who}_loss": metrics.get("loss"),
        f"round/{who}_macro_f1": metrics.get("macro_f1"), f"round/{who}_perplexity": metrics.get("perplexity"),
    }
    return _present({**logged, **harness_metrics(metrics.get("lm_eval"), who)})


def harness_metrics(scores: Mapping[str, Any] | None, who: str) -> dict[str, Any]:
    """evaluate --lm-eval: each task's (and group's) metrics as ``round/<who>_lm_eval/<task>/<metric>``, the path of
    the score in --json (``lm_eval.tasks.<task>.metrics.<metric>``); standard errors are not logged."""
    if not scores:
        return {}
    entries = {**scores["tasks"], **scores["groups"]}
    return {f"round/{who}_lm_eval/{name}/{metric}": value
            for name, entry in entries.items() for metric, value in entry["metrics"].items()}
