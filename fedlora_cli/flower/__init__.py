"""Federations across machines on Flower (flwr 1.42): Flower carries fedlora's folders, fedlora does the rest.

- :mod:`.transport` packs a global checkpoint or a client update into Flower records, byte-exact, and back.
- :mod:`.client_app` is the ClientApp a SuperNode runs at each site: it answers a query (client id, base-model
  fingerprint), trains a round with :func:`fedlora_cli.federation.train_client` and evaluates.
- :mod:`.server_app` is the ServerApp on the SuperLink host: the round loop over fedlora's run folder
  (:class:`fedlora_cli.storage.RunLayout`), aggregating with :func:`fedlora_cli.federation.aggregate_round`.
- :mod:`.app_folder` writes the app folder ``flwr run`` takes: a pyproject.toml pointing at these modules.

flwr is an optional dependency (``pip install 'fedlora[flower]'``): nothing outside this package imports it, and
:func:`require_flwr` turns its absence into one line.
"""

from __future__ import annotations

from fedlora_cli.errors import FedloraError

INSTALL_HINT = "pip install 'fedlora[flower]'"
FLWR_VERSION = "1.42.0"


def require_flwr() -> None:
    """Refuse, in one line, when flwr is not installed."""
    try:
        import flwr  # noqa: F401
    except ImportError:
        raise FedloraError(f"Flower (flwr) is not installed; install it with: {INSTALL_HINT}") from None
