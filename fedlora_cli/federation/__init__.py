"""The federated workflow as importable functions over on-disk folders: the round-0 global checkpoint
(:mod:`.init`), a client's round (:mod:`.client`), the coordinator's round (:mod:`.server`), evaluation
(:mod:`.evaluate`) and a whole federation on one machine (:mod:`.simulate`, imported on its own).

A round ``t`` takes global checkpoint ``t-1`` to client updates of round ``t`` to global checkpoint ``t``.
"""

from fedlora_cli.federation.client import ClientRound, existing_update, site_round, train_client
from fedlora_cli.federation.common import Global, digests, frozen_digest, frozen_labels, plan_of, received_tensors
from fedlora_cli.federation.evaluate import evaluate, evaluate_splits, load_for_evaluation
from fedlora_cli.federation.init import calibrated, init, task_labels
from fedlora_cli.federation.server import AggregateResult, ClientRow, RoundOverrides, aggregate_round, round_recipe

__all__ = [
    "AggregateResult", "ClientRound", "ClientRow", "Global", "RoundOverrides", "aggregate_round",
    "calibrated", "digests", "evaluate", "frozen_digest", "frozen_labels", "init", "load_for_evaluation", "plan_of",
    "received_tensors", "round_recipe", "site_round", "existing_update", "task_labels", "evaluate_splits",
    "train_client",
]
