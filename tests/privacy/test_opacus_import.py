"""fedlora_cli.privacy.opacus_import: opacus' import leaves Python's root logger as it found it, so Flower's log lines
(and any other logger's that passes records to the root) are printed once, not twice."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import pytest

from fedlora_cli.privacy.opacus_import import load


def test_load_removes_the_root_handlers_an_import_added_and_keeps_the_programs(tmp_path, monkeypatch):
    (tmp_path / "configures_logging.py").write_text("import logging\nlogging.basicConfig(format='%(message)s')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    mine = logging.NullHandler()
    monkeypatch.setattr(logging.root, "handlers", [mine])  # restored after the test, whatever load does
    load("configures_logging")
    assert logging.root.handlers == [mine]
    # Without a handler of the program's, basicConfig adds one; load removes it all the same.
    logging.root.handlers = []
    sys.modules.pop("configures_logging")
    load("configures_logging")
    assert logging.root.handlers == []


def test_a_flower_log_line_is_printed_once_after_fedlora_has_used_opacus():
    """In a fresh process (opacus not imported yet), as in a ServerApp calibrating DP-SGD's noise: Flower's line
    after fedlora's first use of opacus came out twice, the second time with opacus' logging prefix."""
    pytest.importorskip("flwr")
    program = textwrap.dedent("""
        from logging import INFO
        from flwr.common.logger import log
        from fedlora_cli.privacy import calibrate
        calibrate(3.0, 1e-5, 0.1, 10)
        log(INFO, "fedlora: a line of the server app")
    """)
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=300, check=True)
    out = done.stdout + done.stderr
    assert out.count("fedlora: a line of the server app") == 1, out
