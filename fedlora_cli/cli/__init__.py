"""The ``fedlora`` command: :mod:`.app` wires the Typer app and its error handling; one module per command group
registers its commands on it (:mod:`.data`, :mod:`.federation`, :mod:`.simulate`, :mod:`.flower`, :mod:`.inspect`,
:mod:`.recipes`, :mod:`.privacy`, :mod:`.export`, :mod:`.assets`). :mod:`.options` holds the option types commands share,
:mod:`.ui` what a person sees (the pictures are the core's, :mod:`fedlora_cli.plots`).

Commands import the core inside their bodies, so ``fedlora --help`` never loads torch or transformers.
"""

from fedlora_cli.cli.app import app, command, main

# Each module registers its commands on ``app`` when imported.
# The order of these imports is the order of the commands in 'fedlora --help'.
from fedlora_cli.cli import data, federation, simulate, flower, inspect, recipes, privacy, export, assets  # noqa: E402, F401  isort: skip

__all__ = ["app", "command", "main"]
