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


from fedlora_cli import storage
from fedlora_cli.data.partition import TEST_SHARD
from fedlora_cli.errors import FedloraError
from fedlora_cli.federation.common import Global, build_for_site
from fedlora_cli.flower import channel, server_app, worker as workers
from fedlora_cli.flower.site import SiteConfig
from fedlora_cli.storage.run_layout import RunLayout
from conftest import private_recipe, recipe_dict
from flower.test_server_app import FakeGrid, run_config, serve, sites, state_of

SECRET = 20261207  # the DP-SGD secret seed, fixed here only (a site draws it from the OS)
ROOT = Path(__file__).resolve().parents[2]


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


def residue(bench) -> dict:
    """What a round could leave on a workbench beyond its tensors: train mode, gradients, Opacus' per-example
    gradients, and hooks (each module's counts)."""
    modules = list(bench.model.modules())
    return {
        "training": [m.training for m in modules],
        "grads": [n for n, p in bench.model.named_parameters() if p.grad is not None],
        "grad_samples": [n for n, p in bench.model.named_parameters() if hasattr(p, "grad_sample")],
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for m in modules],
    }


CASES = {
    "fedavg": (lambda m, d: recipe_dict(m, d, "fedavg"), {}),
    "ffa": (lambda m, d: recipe_dict(m, d, "ffa"), {}),
    "fedsa": (lambda m, d: recipe_dict(m, d, "fedsa", head="local"), {}),
    "ffa-dp-sgd": (lambda m, d: private_recipe(m, d, "ffa", noise_multiplier=1.0), {}),
    "ffa-logit-adjustment": (lambda m, d: recipe_dict(m, d, "ffa", logit_adjustment=1.0), {}),
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
    after_training = []
    train = workers.Worker.train

    def train_and_look(self, request):
        answer = train(self, request)
        after_training.append(residue(self.benches.held()[-1]))
        return answer

    monkeypatch.setattr(workers.Worker, "train", train_and_look)
    try:
        # Three rounds through the relay, an evaluation at the site after each (client-evaluation).
        serve(grid, run_config(short_tmp, raw, partition_dir, **{"client-evaluation": True}))
    finally:
        resident.close()
    layout = RunLayout(short_tmp / "run")
    assert [kind for kind, _ in grid.sent] == ["query"] + ["train", "evaluate"] * 3
    assert resident.worker.benches.loads == 1
    # After each round (and each evaluation) the workbench is as a fresh one: eval mode, no gradient, no hook.
    (used,) = resident.worker.benches.held()
    g = Global.of(layout.global_checkpoint(2))
    unused = build_for_site(g.recipe, g.manifest.num_labels, None, SiteConfig.from_node_config(nodes[101]).settings)
    assert after_training == [residue(unused)] * 3 and residue(used) == residue(unused)
    state = state_of(short_tmp, "client-0")
    before = short_tmp / "state-before-round-3"
    shutil.copytree(state, before, ignore=shutil.ignore_patterns("round-003"))
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


def test_a_bench_shared_by_two_federations_carries_nothing_from_the_first(short_tmp, tiny_model_dir, reviews_csv,
                                                                          partition_dir):
    from fedlora_cli.federation import train_client

    # Prepare: federation A aggregates exactly (a base-weight correction from round 1 on), B plainly; one workbench.
    benches = workers.Benches()
    layouts = {}
    for name, aggregation, rounds in (("a", "exact", 2), ("b", "mean", 3)):
        raw = recipe_dict(tiny_model_dir, reviews_csv)
        raw["federation"].update(rounds=rounds, clients=2, client_ids=["client-0", "client-1"],
                                 aggregation=aggregation)
        nodes = sites(short_tmp / name, partition_dir, n=2)
        nodes[101]["worker"] = "required"
        resident = InProcessWorker(nodes[101], benches)
        try:
            serve(FakeGrid(nodes), run_config(short_tmp / name, raw, partition_dir))
        finally:
            resident.close()
        layouts[name] = RunLayout(short_tmp / name / "run")
    assert storage.read_global(layouts["a"].global_checkpoint(1)).manifest.correction_digests
    assert benches.loads == 1, resident.lines  # B was trained on the model A's corrections went through
    # Execute: B's third round again, on a workbench built afresh
    state = state_of(short_tmp / "b", "client-0")
    before = short_tmp / "before"
    shutil.copytree(state, before, ignore=shutil.ignore_patterns("round-003"))
    fresh = train_client(layouts["b"].global_checkpoint(2), sites(short_tmp, partition_dir)[101]["data"], before,
                         short_tmp / "fresh", "client-0")
    # Assert
    assert fresh.update.manifest.tensor_digests == tensor_digests(layouts["b"].update(3, "client-0"),
                                                                  storage.UPDATE_MANIFEST)


def _toml(node: dict) -> str:
    return " ".join(f"{key}={json.dumps(value)}" for key, value in node.items())


class Spawned:
    """Worker processes a test starts, each ended by its PID when the test ends."""

    def __init__(self, folder: Path):
        self.folder, self.procs = folder, []

    def start(self, node: dict) -> subprocess.Popen:
        log = open(self.folder / f"worker-{len(self.procs)}.log", "w")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen([sys.executable, "-m", "fedlora_cli", "flower", "worker", "--node-config", _toml(node)],
                                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
        log.close()
        self.procs.append(proc)
        sock = channel.socket_path(Path(node["state-dir"]))
        deadline = time.monotonic() + 120
        while not self._listening(sock):
            assert proc.poll() is None, self.log(proc)
            assert time.monotonic() < deadline, "the worker did not listen within 120 s"
            time.sleep(0.1)
        return proc

    @staticmethod
    def _listening(path: Path) -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(path))
                return True
            except OSError:
                return False

    def log(self, proc: subprocess.Popen) -> str:
        return (self.folder / f"worker-{self.procs.index(proc)}.log").read_text()

    def end_all(self):
        for proc in self.procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)


@pytest.fixture
def spawned(short_tmp):
    procs = Spawned(short_tmp)
    try:
        yield procs
    finally:
        procs.end_all()


class RoundHooks(FakeGrid):
    """The fake Grid, calling ``before_train(round)`` before it routes a round's train message to node 101."""

    def __init__(self, nodes, before_train):
        super().__init__(nodes)
        self.before_train = before_train

    def send_and_receive(self, messages, *, timeout=None):
        for msg in messages:
            if msg.metadata.message_type == "train" and msg.metadata.dst_node_id == 101:
                self.before_train(int(msg.metadata.group_id.split("-")[1]))
        return super().send_and_receive(messages, timeout=timeout)


def test_a_worker_killed_mid_round_costs_that_round_its_client_and_a_restarted_one_serves_the_next(
        short_tmp, spawned, tiny_model_dir, reviews_csv, partition_dir):
    # Prepare: client-0 relays to a worker process; client-1 works in its ClientApp. Rounds take seconds.
    raw = recipe_dict(tiny_model_dir, reviews_csv, local_steps=300)
    raw["federation"].update(clients=2, client_ids=["client-0", "client-1"])
    nodes = sites(short_tmp, partition_dir, n=2)
    nodes[101]["worker"] = "required"
    first = spawned.start(nodes[101])
    workers_started = [first]
    killer = []

    def before_train(round_: int) -> None:
        if round_ == 1:  # SIGKILL by PID while it trains (its model is warm from the query: it starts at once)
            killer.append(threading.Timer(1.0, os.kill, (first.pid, signal.SIGKILL)))
            killer[0].start()
        else:  # a restarted worker, asked to stop (SIGTERM) while it trains: it finishes the round first
            workers_started.append(spawned.start(nodes[101]))
            killer.append(threading.Timer(1.0, os.kill, (workers_started[1].pid, signal.SIGTERM)))
            killer[1].start()

    said = []
    grid = RoundHooks(nodes, before_train)
    config = run_config(short_tmp, raw, partition_dir)
    # Execute
    rows = server_app.Coordinator(grid, server_app.Settings.from_run_config(config),
                                  lambda level, text: said.append(text)).run()
    for timer in killer:
        timer.join()
    # Assert: round 1 went on without client-0, named with what its worker was doing; round 2 had both
    sock = channel.socket_path(Path(nodes[101]["state-dir"]))
    assert first.wait(timeout=30) == -signal.SIGKILL
    assert (f"round 1: client 'client-0' did not train: the site worker at {sock} stopped while training round 1; "
            "left out") in said
    assert [(row["clients"], row["left_out"]) for row in rows] == [(1, ["client-0"]), (2, [])]
    layout = RunLayout(short_tmp / "run")
    assert storage.read_global(layout.global_checkpoint(2)).manifest.clients == ["client-0", "client-1"]
    # The restarted worker removed the socket the killed one left; told to stop mid-round, it answered the round,
    # then stopped cleanly, removing its own socket.
    second = workers_started[1]
    assert second.wait(timeout=60) == 0, spawned.log(second)
    log = spawned.log(second)
    assert "removed the socket a stopped worker left at" in log
    assert log.index("stopping after the request in progress") < log.index("trained round 2 (tiny-fedavg)")
    assert "client-0: stopped (1 request(s) served, 1 base load(s))" in log
    assert not sock.exists()


def test_two_requests_never_run_at_once_the_second_waits_its_turn(short_tmp):
    node = {"client-id": "a", "state-dir": str(short_tmp / "s")}

    class Slow(workers.Worker):
        running, most = 0, 0

        def query(self, request):
            Slow.running += 1
            Slow.most = max(Slow.most, Slow.running)
            time.sleep(0.3)
            Slow.running -= 1
            return {"client-id": "a"}, "said who it is"

    service = workers.Service(Slow(SiteConfig.from_node_config(node), log=lambda line: None))
    answers = []
    try:
        asking = [threading.Thread(target=lambda: answers.append(channel.ask(
            service.path, {"op": "query", "node-config": node}, "saying who the site is"))) for _ in range(2)]
        for thread in asking:
            thread.start()
        for thread in asking:
            thread.join(timeout=30)
    finally:
        service.close()
    assert answers == [{"client-id": "a"}] * 2
    assert Slow.most == 1


def test_a_worker_refuses_unknown_requests_and_another_protocol_in_one_line():
    worker = workers.Worker(SiteConfig.from_node_config({"client-id": "a", "state-dir": "/s"}), log=lambda line: None)
    node = {"client-id": "a", "state-dir": "/s"}
    ours, other = channel.PROTOCOL, channel.PROTOCOL - 1
    assert worker.handle({"protocol": ours, "op": "shell", "node-config": node}) == {
        "error": "unknown request 'shell' (known: query, train, evaluate)"}
    assert worker.handle({"protocol": other, "op": "query", "node-config": node})["error"].startswith(
        f"the relay speaks protocol {other}, this worker {ours}")
    assert worker.handle({"protocol": ours, "op": "train", "node-config": node, "round": "1"}) == {
        "error": "a train or evaluate request needs the received global's round and digest"}
    # A federation's folder is a plain name: a request cannot point the worker at another folder.
    assert worker.handle({"protocol": ours, "op": "train", "node-config": node, "round": 1, "digest": "d",
                          "federation": "../../etc-0123456789abcdef"}) == {
        "error": "'../../etc-0123456789abcdef' is not a federation's folder name (NAME-<16 hex digits>)"}


def test_a_worker_will_not_start_beside_a_live_one_or_over_a_file_that_is_not_a_socket(short_tmp):
    site = SiteConfig.from_node_config({"client-id": "a", "state-dir": str(short_tmp / "s")})
    said = []
    first = workers.Service(workers.Worker(site, log=said.append))
    try:
        assert oct(os.stat(first.path).st_mode & 0o777) == "0o600"
        with pytest.raises(FedloraError, match="^a site worker already listens at .*; stop it first$"):
            workers.Service(workers.Worker(site, log=lambda line: None))
        time.sleep(0.5)  # the probe's handler thread has had its turn
    finally:
        first.close()
    assert said == []  # the second one's probe (connect, hang up) is no request, and not logged as one
    assert not first.path.exists()
    first.path.write_text("mine")
    with pytest.raises(FedloraError, match="exists and is not a socket; refusing to replace it$"):
        workers.Service(workers.Worker(site, log=lambda line: None))
    assert first.path.read_text() == "mine"


def test_at_most_capacity_workbenches_are_kept_least_recently_used_dropped_first(make_recipe):
    site = SiteConfig.from_node_config({"client-id": "a", "state-dir": "/s"})
    one, other = make_recipe(), make_recipe(seed=1)  # another seed initialises another head and adapter
    benches = workers.Benches(capacity=1)
    first = benches.get(site, one, 2, 4)
    assert benches.get(site, one, 2, 4) is first and benches.loads == 1
    benches.get(site, other, 2, 4)
    assert benches.loads == 2 and len(benches) == 1
    assert benches.get(site, one, 2, 4) is not first and benches.loads == 3
    with pytest.raises(FedloraError, match="at least one workbench"):
        workers.Benches(capacity=0)


def test_federations_differing_only_in_threads_share_one_workbench_each_with_its_own_count(make_recipe):
    import torch

    site = SiteConfig.from_node_config({"client-id": "a", "state-dir": "/s"})
    benches = workers.Benches(capacity=1)
    own = torch.get_num_threads()
    one, two = (benches.get(site, make_recipe(threads=n), 2, 4) for n in (1, 2))
    assert benches.loads == 1  # the threads load nothing: the second federation reuses the first one's base
    assert two.model is one.model and (one.site.threads, two.site.threads) == (1, 2)
    with two.site.cpu_threads():  # how training and evaluation apply the site's count
        assert torch.get_num_threads() == 2
    assert benches.get(site, make_recipe(threads=1), 2, 4) is one and torch.get_num_threads() == own


def test_the_worker_command_refuses_a_bad_node_config_in_one_line(tmp_path):
    from cli.helpers import fails

    fails(["flower", "worker", "--node-config", "client-id=a b"], "--node-config: The provided configuration string")
    fails(["flower", "worker", "--node-config", f'client-id="a" state-dir="{tmp_path}" worker="off"'],
          'this --node-config says worker="off"')
    fails(["flower", "worker", "--node-config", f'client-id="a" state-dir="{tmp_path}" devise="cpu"'],
          "node config key 'devise' is unknown")
    fails(["flower", "worker", "--node-config", f'client-id="a" state-dir="{tmp_path}"', "--max-benches", "0"],
          "a site worker holds at least one workbench; got 0")
    fails(["flower", "worker", "--node-config", f'client-id="a" state-dir="{tmp_path}" device="cuda:7"'],
          "training.device 'cuda:7': this machine has")
    assert not (tmp_path / "worker.sock").exists()
    fails(["flower", "node-config", "--client-id", "a", "--state-dir", str(tmp_path), "--worker", "maybe"],
          "--worker must be one of auto, required, off; got 'maybe'")


def test_node_config_writes_the_worker_key_the_site_reads(tmp_path):
    from cli.helpers import ok

    written = ok(["flower", "node-config", "--client-id", "a", "--state-dir", tmp_path, "--worker", "required"])
    assert SiteConfig.from_node_config(workers.parse_node_config(written.strip())).worker == "required"


@pytest.mark.parametrize("frame", [b"[" * 200_000 + b"\n", b'{"round": ' + b"9" * 5000 + b"}\n", b"\xff\n", b"[1]\n",
                                   b"{" * (channel.MAX_BYTES + 10)])
def test_a_frame_that_is_not_one_small_json_object_is_refused_in_one_line(frame):
    import io

    with pytest.raises(FedloraError, match="^a message on the site worker's socket (is not JSON|is not a JSON object|"
                                           "is longer than 1048576 bytes); refused$"):
        channel.read_frame(io.BytesIO(frame))
