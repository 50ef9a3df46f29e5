"""The resident site worker (fedlora_cli.flower.worker) behind the ClientApp relay: its third round is bit-identical
to a fresh `fedlora train-client` process's, the relay imports no torch, a worker killed mid-round costs the round
only that client and a restarted one serves the next, and only a 0600 socket of this user is ever spoken to."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedlora_cli import storage
from fedlora_cli.data.partition import TEST_SHARD
from fedlora_cli.errors import FedloraError
from fedlora_cli.flower import channel, client_app, server_app, worker as workers
from fedlora_cli.flower.site import SiteConfig
from fedlora_cli.storage.run_layout import RunLayout
from conftest import private_recipe, recipe_dict
from flower.test_server_app import FakeGrid, run_config, serve, sites

SECRET = 20261207  # the DP-SGD secret seed, fixed here only (a site draws it from the OS)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def task_identity():
    saved = TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


@pytest.fixture
def short_tmp():
    """A short folder (a Unix socket path is at most 107 bytes; pytest's tmp_path can be longer)."""
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="fw-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


class InProcessWorker:
    """A worker served from a thread of this process (enough where nothing is killed)."""

    def __init__(self, node_config: dict, benches: workers.Benches | None = None):
        self.lines: list[str] = []
        self.worker = workers.Worker(SiteConfig.from_node_config(node_config), benches, self.lines.append)
        self.service = workers.Service(self.worker)

    def close(self):
        self.service.close()


def tensor_digests(folder: Path, manifest: str) -> dict[str, str]:
    return json.loads((folder / manifest).read_text())["tensor_digests"]


def fresh_train_client(g: Path, node: dict, state: Path, out: Path, *options: str) -> None:
    """`fedlora train-client` in a fresh process, with the DP secret seed fixed as the worker's test fixes it."""
    code = (f"import secrets; secrets.randbits = lambda k: {SECRET}; import sys; sys.argv[0] = 'fedlora'; "
            "from fedlora_cli.cli import main; main()")
    args = [sys.executable, "-c", code, "train-client", str(g), "--data", node["data"], "--state", str(state),
            "--out", str(out), "--client-id", node["client-id"], *options]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr


CASES = {
    "fedavg": (lambda m, d: recipe_dict(m, d, "fedavg"), {}),
    "ffa": (lambda m, d: recipe_dict(m, d, "ffa"), {}),
    "fedsa": (lambda m, d: recipe_dict(m, d, "fedsa", head="local"), {}),
    "ffa-dp-sgd": (lambda m, d: private_recipe(m, d, "ffa", noise_multiplier=1.0), {}),
    "fedavg-4bit": (lambda m, d: recipe_dict(m, d, "fedavg"), {"quantization": "4bit"}),
}


def _bitsandbytes_trains() -> str | None:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return "bitsandbytes is not installed"
    return None


@pytest.mark.parametrize("case", list(CASES))
def test_a_workers_third_round_is_bit_identical_to_a_fresh_train_client(case, short_tmp, monkeypatch, tiny_model_dir,
                                                                       reviews_csv, partition_dir):
    make, extra = CASES[case]
    if "quantization" in extra and _bitsandbytes_trains():
        pytest.skip(_bitsandbytes_trains())
    monkeypatch.setattr("secrets.randbits", lambda k: SECRET)
    raw = make(tiny_model_dir, reviews_csv)
    raw["federation"].update(rounds=3, clients=1, client_ids=["client-0"])
    nodes = {101: {**sites(short_tmp, partition_dir, n=1)[101], "worker": "required", **extra}}
    nodes[101]["test-data"] = str(partition_dir / TEST_SHARD)
    grid = FakeGrid(nodes)
    resident = InProcessWorker(nodes[101])
    try:
        # Three rounds through the relay, an evaluation at the site after each (client-evaluation).
        serve(grid, run_config(short_tmp, raw, partition_dir, **{"client-evaluation": True}))
    finally:
        resident.close()
    layout = RunLayout(short_tmp / "run")
    assert [kind for kind, _ in grid.sent] == ["query"] + ["train", "evaluate"] * 3
    assert resident.worker.benches.loads == 1
    state = short_tmp / "sites" / "client-0"
    before = short_tmp / "state-before-round-3"
    shutil.copytree(state, before, ignore=shutil.ignore_patterns("round-003", "flower", "*.sock"))
    fresh = short_tmp / "fresh-update"
    fresh_train_client(layout.global_checkpoint(2), nodes[101], before, fresh,
                       *(["--quantization", "4bit"] if extra else []))
    worker_update = layout.update(3, "client-0")
    # The site loaded its base as its node config says (a 4-bit base is 4-bit), and trained under DP-SGD.
    sent = json.loads((worker_update / storage.UPDATE_MANIFEST).read_text())
    assert sent["site"]["quantization"] == extra.get("quantization", "none")
    assert (sent["privacy"] is not None) == ("privacy" in raw)
    assert tensor_digests(worker_update, storage.UPDATE_MANIFEST) == tensor_digests(fresh, storage.UPDATE_MANIFEST)
    assert (tensor_digests(state / "round-003", storage.STATE_MANIFEST)
            == tensor_digests(before / "round-003", storage.STATE_MANIFEST))
