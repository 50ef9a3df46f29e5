"""Opacus, imported without what its import does to Python's logging.

Importing opacus (1.5) runs ``logging.basicConfig`` (in ``opacus.utils.module_utils``): a handler on the root logger,
so every record that reaches the root from then on is printed a second time, with opacus' prefix
(``12/07/2026 09:17:56:INFO:...``). Flower's logger ('flwr') prints with a handler of its own and passes each record on
to the root: in a ServerApp or ClientApp process that had imported opacus (a DP-SGD round, the coordinator
calibrating noise or accounting), every line of the log came out twice. fedlora imports opacus only through
:func:`load`, which removes the root handlers that the import added, and only those (a handler the program set up
itself stays).
"""

from __future__ import annotations

import importlib
import logging
import threading
from types import ModuleType

_lock = threading.Lock()  # two threads importing at once would each see the other's handler as "before"


def load(name: str = "opacus") -> ModuleType:
    """The module ``name`` (opacus or one of its submodules), imported with the root logger's handlers unchanged."""
    with _lock:
        before = list(logging.root.handlers)
        module = importlib.import_module(name)
        for handler in [h for h in logging.root.handlers if h not in before]:
            logging.root.removeHandler(handler)
    return module
