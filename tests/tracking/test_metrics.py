"""fedlora_cli.tracking.metrics: what each command logs, under --json's names; a DP-SGD client's loss never
leaves it through the coordinator's trackers."""

from __future__ import annotations

from types import SimpleNamespace

from fedlora_cli.tracking.metrics import (
    aggregate_metrics, client_round_metrics, evaluation_metrics, round_metrics, step_logger,
)

ROW = {"round": 2, "train_loss": 0.61, "global_accuracy": 0.75, "global_macro_f1": 0.7, "global_loss": 0.5,
       "personalised_accuracy": None, "personalised_accuracy_own_mix": None, "personalised_loss": None,
       "upload_bytes": 900, "upload_bytes_per_client": 300, "seconds": 4.5, "epsilon": 1.25}


def test_a_round_row_under_its_json_names_without_the_loss_under_dp():
    assert round_metrics(ROW, private=False) == {
        "round/train_loss": 0.61, "round/global_accuracy": 0.75, "round/global_macro_f1": 0.7,
        "round/global_loss": 0.5, "round/upload_bytes": 900.0, "round/upload_bytes_per_client": 300.0,
        "round/seconds": 4.5, "round/epsilon": 1.25,
    }
    assert "round/train_loss" not in round_metrics(ROW, private=True)


def test_the_step_logger_counts_steps_across_rounds_and_passes_progress_on():
    logged, seen = [], []
    callback = step_logger(lambda step, m: logged.append((step, m)), "client-1", 3, lambda *a: seen.append(a))
    callback(1, 5, 0.9)
    callback(2, 5, float("nan"))  # an empty Poisson sample: nothing to log
    assert logged == [(11, {"step/client-1/train_loss": 0.9})]
    assert seen == [(1, 5, 0.9), (2, 5, seen[1][2])]


def test_what_train_client_aggregate_and_evaluate_log():
    update = SimpleNamespace(client_id="client-0", bytes=300, num_examples=24, steps=3, seconds=1.5,
                             privacy={"epsilon": 2.5})
    assert client_round_metrics(update, 0.7) == {
        "round/client-0/train_loss": 0.7, "round/client-0/upload_bytes": 300.0, "round/client-0/examples": 24.0,
        "round/client-0/steps": 3.0, "round/client-0/seconds": 1.5, "round/client-0/epsilon": 2.5,
    }
    clients = [SimpleNamespace(client_id="a", weight=0.25, update_norm=1.5, bytes=100, loss=None),
               SimpleNamespace(client_id="b", weight=0.75, update_norm=0.5, bytes=100, loss=0.4)]
    assert aggregate_metrics(SimpleNamespace(clients=clients, server_epsilon=None)) == {
        "round/upload_bytes": 200.0, "round/clients": 2.0, "round/a/weight": 0.25, "round/a/update_norm": 1.5,
        "round/a/upload_bytes": 100.0, "round/b/weight": 0.75, "round/b/update_norm": 0.5,
        "round/b/upload_bytes": 100.0, "round/b/train_loss": 0.4,
    }
    assert evaluation_metrics({"personalised": False, "accuracy": 0.8, "macro_f1": 0.7, "loss": 0.4}) == {
        "round/global_accuracy": 0.8, "round/global_loss": 0.4, "round/global_macro_f1": 0.7}
    assert evaluation_metrics({"personalised": True, "exact_match": 0.1, "loss": 2.0, "perplexity": 7.4}) == {
        "round/personalised_accuracy": 0.1, "round/personalised_loss": 2.0, "round/personalised_perplexity": 7.4}
