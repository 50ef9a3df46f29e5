"""The client app on its own: a site's --node-config is checked, and a site that cannot answer replies fedlora's
one line instead of raising (the re-sent round and the DP reply are in test_server_app, through a fake Grid)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from flwr.app import ConfigRecord, Context, RecordDict

from fedlora_cli.errors import FedloraError
from fedlora_cli.flower import client_app
from fedlora_cli.flower.site import SiteConfig, federation_folder, manifest_of


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


# -- the relay to a resident site worker (fedlora_cli.flower.worker) ---------------------------------------------


@pytest.fixture
def short_tmp():
    """A short folder: a Unix socket path is at most 107 bytes, and pytest's tmp_path can be longer."""
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="fr-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _query_reply(node_config: dict) -> str:
    """The error a query gets from the client app under ``node_config`` ('' when it has none)."""
    msg = client_app.Message(RecordDict({client_app.QUERY: ConfigRecord({client_app.MANIFEST_KEY: "{}"})}), 5,
                             "query")
    msg.metadata.__dict__["_message_id"] = "m1"
    reply = client_app.app(msg, Context(run_id=1, node_id=5, node_config=node_config, state=RecordDict(),
                                        run_config={}))
    return str(reply.content[client_app.REPLY].get(client_app.ERROR_KEY, ""))


def _listening(path: Path, mode: int):
    import socket

    path.parent.mkdir(parents=True, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen()
    os.chmod(path, mode)
    return sock


def test_the_relay_refuses_a_socket_open_to_others_not_a_socket_or_another_users(short_tmp, monkeypatch):
    node = {"client-id": "a", "state-dir": str(short_tmp / "s")}
    path = short_tmp / "s" / "worker.sock"
    sock = _listening(path, 0o666)
    try:
        assert _query_reply(node) == (f"the site worker's socket {path} has permissions 0666, open to other users "
                                      "(it must be 0600); refused")
        os.chmod(path, 0o660)
        assert "has permissions 0660" in _query_reply(node)
        os.chmod(path, 0o600)
        monkeypatch.setattr(os, "getuid", lambda: 4242)
        assert _query_reply(node) == (f"the site worker's socket {path} is owned by uid {os.stat(path).st_uid}, not "
                                      "by this user (uid 4242); refused")
    finally:
        sock.close()
    path.unlink()
    path.write_text("not a socket")
    assert _query_reply(node) == f"{path} is not a socket; refusing to use it as the site worker's"


def test_a_required_worker_that_is_not_there_or_serves_another_site_is_an_error_reply(short_tmp):
    from fedlora_cli.flower import worker as workers

    node = {"client-id": "a", "state-dir": str(short_tmp / "s"), "worker": "required"}
    assert _query_reply(node).startswith(f"no site worker at {short_tmp / 's' / 'worker.sock'} (start it with: ")
    # A worker started with another --node-config (other data) than the SuperNode's refuses to serve it.
    served = workers.Service(workers.Worker(SiteConfig.from_node_config({**node, "data": "/d/other.csv"}),
                                            log=lambda line: None))
    try:
        assert _query_reply(node) == ("this site worker was started with another --node-config than the SuperNode's "
                                      "(data differs): restart it with the SuperNode's")
    finally:
        served.close()
    assert not (short_tmp / "s" / "worker.sock").exists()
    # Off: the socket is never looked at (here the app then works itself, and the empty manifest is refused).
    _listening(short_tmp / "s" / "worker.sock", 0o666).close()
    assert "permissions" not in _query_reply({**node, "worker": "off"})


def test_the_worker_key_is_checked():
    with pytest.raises(FedloraError, match="node config worker must be one of auto, required, off, got 'yes'"):
        SiteConfig.from_node_config({"client-id": "a", "state-dir": "/s", "worker": "yes"})
    assert SiteConfig.from_node_config({"client-id": "a", "state-dir": "/s"}).worker == "auto"


RELAY = r'''
import json, os, socket, sys, threading
import os
from pathlib import Path
from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from fedlora_cli.flower import channel, client_app, transport

TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
node, global_dir = json.loads(sys.argv[1]), Path(sys.argv[2])
path = channel.socket_path(Path(node["state-dir"]))
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.bind(str(path))
os.chmod(path, 0o600)
server.listen()
seen = []

def answer():  # a stand-in worker: the relay's requests, canned answers
    for ok in ({"client-id": node["client-id"], "base-fingerprint": "f" * 16, "site": "cpu"}, {"resent": False}):
        conn, _ = server.accept()
        with conn, conn.makefile("rwb") as stream:
            seen.append(channel.read_frame(stream))
            channel.write_frame(stream, {"ok": ok})

threading.Thread(target=answer, daemon=True).start()
context = Context(run_id=1, node_id=5, node_config=node, state=RecordDict(), run_config={})
manifest = (global_dir / "fedlora.json").read_text()
query = Message(RecordDict({client_app.QUERY: client_app.ConfigRecord({client_app.MANIFEST_KEY: manifest})}), 5,
                "query")
train = Message(RecordDict(transport.pack(global_dir, client_app.GLOBAL)), 5, "train")
replies = []
for i, msg in enumerate((query, train)):
    msg.metadata.__dict__["_message_id"] = f"m{i}"
    replies.append(client_app.app(msg, context))
print(json.dumps({"ops": [r["op"] for r in seen], "node-config": seen[1]["node-config"],
                  "federation": seen[1]["federation"],
                  "answer": dict(replies[0].content[client_app.REPLY]), "train": sorted(replies[1].content.keys()),
                  "heavy": sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "peft"))}))
'''


def test_the_relay_imports_no_torch_and_sends_the_update_the_worker_wrote(short_tmp, federation_of):
    import json
    import shutil
    import subprocess
    import sys

    layout = federation_of("fedavg")
    node = {"client-id": "client-0", "state-dir": str(short_tmp / "s"), "data": "/d/a.csv"}
    # What the worker would have written for round 1, where the site keeps it.
    g0 = manifest_of((layout.global_checkpoint(0) / "fedlora.json").read_text())
    shutil.copytree(layout.update(1, "client-0"), SiteConfig.from_node_config(node).update(federation_folder(g0), 1))
    done = subprocess.run([sys.executable, "-c", RELAY, json.dumps(node), str(layout.global_checkpoint(0))],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["heavy"] == []
    assert out["ops"] == ["query", "train"] and out["node-config"] == node
    assert out["federation"] == federation_folder(g0)
    assert out["answer"] == {"client-id": "client-0", "base-fingerprint": "f" * 16, "site": "cpu"}
    assert out["train"] == ["fedlora.reply", "update.files", "update.text"]


def test_the_relay_waits_for_the_worker_no_longer_than_the_message_lives(short_tmp):
    import time

    from fedlora_cli.flower import worker as workers

    node = {"client-id": "a", "state-dir": str(short_tmp / "s")}

    class Stuck(workers.Worker):
        def query(self, request):
            time.sleep(2.0)
            return {"client-id": "a"}, "said who it is"

    service = workers.Service(Stuck(SiteConfig.from_node_config(node), log=lambda line: None))
    try:
        msg = client_app.Message(RecordDict({client_app.QUERY: ConfigRecord({client_app.MANIFEST_KEY: "{}"})}), 5,
                                 "query", ttl=1.0)
        msg.metadata.__dict__["_message_id"] = "m1"
        started = time.monotonic()
        reply = client_app.app(msg, Context(run_id=1, node_id=5, node_config=node, state=RecordDict(),
                                            run_config={}))
        waited = time.monotonic() - started
    finally:
        service.close()
    error = reply.content[client_app.REPLY][client_app.ERROR_KEY]
    assert re.fullmatch(rf"the site worker at {re.escape(str(service.path))} gave no answer within 0\.[789] s while "
                        r"saying who the site is \(the message expires; a round asked again is sent the update it "
                        r"makes\)", error), error
    assert 0.8 < waited < 1.5


def test_a_recipe_name_with_runs_of_dots_still_names_a_federation_folder():
    from types import SimpleNamespace

    for name, start in (("quick..start", "quick.start-"), ("..", "federation-"), ("a/../b", "a-.-b-")):
        manifest = SimpleNamespace(recipe={"name": name}, recipe_digest="sha256:" + "ab" * 32)
        assert federation_folder(manifest) == start + "ab" * 8
