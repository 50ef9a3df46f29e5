"""What the Flower tests share."""

from __future__ import annotations

import pytest

SUPERLINK_NODE = 0


@pytest.fixture(autouse=True)
def task_identity():
    """A Message built outside a Flower run needs the task identity a ServerApp process is given (nothing to set
    when flwr is not installed: those tests skip themselves)."""
    try:
        from flwr.supercore.task_identity import TaskIdentity
    except ImportError:
        yield
        return
    saved = TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SUPERLINK_NODE, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
