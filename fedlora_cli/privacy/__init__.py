"""Differential privacy: accounting (:mod:`.accounting`), DP-SGD at a client (:mod:`.dp_sgd`), DP-FedAvg at the
coordinator (:mod:`.dp_fedavg`), the coordinator's ledger (:mod:`.ledgers`), spending reports (:mod:`.report`) and
choosing a plan that learns (:mod:`.planning`)."""

from fedlora_cli.privacy.accounting import (
    CALIBRATION_MARGIN, SERVER_ACCOUNTANT, ClientPlan, Entry, Ledger, calibrate, calibrate_noise,
    check_delta, client_plan, epsilon, gaussian_epsilon, server_accounted, server_epsilon,
)
from fedlora_cli.privacy.dp_fedavg import dp_fedavg
from fedlora_cli.privacy.dp_sgd import DPSGD, poisson_batches
from fedlora_cli.privacy.ledgers import (
    ServerLedger, coordinator_ledger, read_server_ledger, server_ledger_path, write_server_ledger,
)

__all__ = [
    "CALIBRATION_MARGIN", "SERVER_ACCOUNTANT", "ClientPlan", "DPSGD", "Entry", "Ledger", "ServerLedger", "calibrate",
    "calibrate_noise",
    "check_delta", "client_plan", "coordinator_ledger", "dp_fedavg", "epsilon", "gaussian_epsilon", "poisson_batches",
    "read_server_ledger", "server_accounted", "server_epsilon", "server_ledger_path", "write_server_ledger"
]
