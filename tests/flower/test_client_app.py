"""The client app on its own: a site's --node-config is checked, and a site that cannot answer replies fedlora's
one line instead of raising (the re-sent round and the DP reply are in test_server_app, through a fake Grid)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("flwr")

from flwr.app import ConfigRecord, Context, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedlora_cli.errors import FedloraError
from fedlora_cli.flower import client_app
from fedlora_cli.flower.site import SiteConfig


@pytest.fixture(autouse=True)
def task_identity():
    saved = TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def test_the_node_config_is_checked():
    with pytest.raises(FedloraError, match="lacks client-id"):
        SiteConfig.from_node_config({"state-dir": "/s"})
    with pytest.raises(FedloraError, match="node config key 'devise' is unknown"):
        SiteConfig.from_node_config({"client-id": "a", "state-dir": "/s", "devise": "cpu"})
    site = SiteConfig.from_node_config({"client-id": "a", "state-dir": "/s", "device": "cpu",
                                        "gradient-checkpointing": True})
    assert site.work_dir == Path("/s/flower")
    assert site.settings == {"training.device": "cpu", "training.gradient_checkpointing": True}


def test_a_reply_with_an_error_record_names_the_node_config_problem(tmp_path):
    msg = client_app.Message(RecordDict({client_app.QUERY: ConfigRecord({client_app.MANIFEST_KEY: "{}"})}), 5,
                             "query")
    msg.metadata.__dict__["_message_id"] = "m1"
    reply = client_app.app(msg, Context(run_id=1, node_id=5, node_config={"client-id": "a"}, state=RecordDict(),
                                        run_config={}))
    assert reply.content[client_app.REPLY][client_app.ERROR_KEY] == (
        "the SuperNode's --node-config lacks state-dir=\"...\" (a quoted string)")
