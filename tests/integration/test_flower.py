"""A real Flower deployment on 127.0.0.1: a SuperLink and two SuperNodes (free ports, a temporary FLWR_HOME), two
rounds of the tiny recipe through ``flwr run``; each global checkpoint is the one fedlora aggregate writes from the
same update folders. Every process started here (and every child it started) is ended by its PID."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import recipe_dict

pytest.importorskip("flwr")
psutil = pytest.importorskip("psutil")

from fedlora_cli import federation, storage
from fedlora_cli.data.partition import TEST_SHARD, shard_name
from fedlora_cli.flower.app_folder import node_config, write_app
from fedlora_cli.storage.run_layout import RunLayout

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check, seconds: float, what: str) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if check():
            return
        time.sleep(0.5)
    raise AssertionError(f"{what} within {seconds:g} s")


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


def end(processes: list[subprocess.Popen]) -> None:
    """SIGTERM each process and each of its descendants by PID; SIGKILL whatever is left after 30 s."""
    pids = []
    for p in processes:
        try:
            pids += [c.pid for c in psutil.Process(p.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
        pids.append(p.pid)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for p in processes:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    for pid in pids:
        if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
            os.kill(pid, signal.SIGKILL)
    for p in processes:
        p.wait(timeout=10)


def test_two_rounds_on_a_real_superlink_and_two_supernodes(tmp_path, tiny_model_dir, reviews_csv, partition_dir):
    home = tmp_path / "flwr-home"
    home.mkdir()
    link, health = free_port(), free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{link}"\ninsecure = true\n'
    )
    env = {**os.environ, "FLWR_HOME": str(home), "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}  # flower-superexec is found on PATH
    raw = recipe_dict(tiny_model_dir, reviews_csv)
    raw["federation"]["clients"] = 2
    raw["federation"]["client_ids"] = ["site-a", "site-b"]
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(raw))
    run = tmp_path / "run"
    app = write_app(tmp_path / "recipe.yaml", tmp_path / "app", run, round_timeout=240,
                    test=str(partition_dir / TEST_SHARD)).parent
    logs = tmp_path / "logs"
    logs.mkdir()
    processes: list[subprocess.Popen] = []

    def start(name: str, *args: str) -> subprocess.Popen:
        out = open(logs / f"{name}.log", "w")  # noqa: SIM115 - closed when the process ends
        p = subprocess.Popen([str(BIN / args[0]), *args[1:]], env=env, stdout=out, stderr=subprocess.STDOUT,
                             cwd=tmp_path)
        processes.append(p)
        return p

    started = time.monotonic()
    try:
        start("superlink", "flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(link),
              "--disable-runtime-dependency-installation", "--health-server-address", f"127.0.0.1:{health}")
        wait_until(lambda: listening(link) and listening(health), 60, "the SuperLink was not listening")
        for i, cid in enumerate(["site-a", "site-b"]):
            config = node_config(cid, str(partition_dir / shard_name(f"client-{i}")), str(tmp_path / "sites" / cid))
            start(cid, "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link}", "--host", "127.0.0.1",
                  "--port", str(free_port()), "--node-config", config)
        flwr = subprocess.run([str(BIN / "flwr"), "run", str(app), "local", "--stream"], env=env, cwd=tmp_path, check=False,
                              capture_output=True, text=True, timeout=420)
        (logs / "flwr-run.log").write_text(flwr.stdout + flwr.stderr)
        listed = subprocess.run([str(BIN / "flwr"), "list", "local", "--format", "json"], env=env, cwd=tmp_path, check=False,
                                capture_output=True, text=True, timeout=60)
    finally:
        end(processes)
    seconds = time.monotonic() - started
    layout = RunLayout(run)
    assert [p.name for p in layout.global_checkpoints()] == ["round-000", "round-001", "round-002"], \
        (logs / "flwr-run.log").read_text()[-3000:]
    assert '"finished:completed"' in listed.stdout.replace(" ", ""), listed.stdout
    for round_ in (1, 2):
        updates = [layout.update(round_, cid) for cid in ("site-a", "site-b")]
        again = federation.aggregate_round(layout.global_checkpoint(round_ - 1), updates, tmp_path / f"again-{round_}")
        assert storage.read_global(layout.global_checkpoint(round_)).manifest.digest == again.checkpoint.manifest.digest
    assert storage.state_rounds(tmp_path / "sites" / "site-a") == [1, 2]
    for p in processes:
        assert not psutil.pid_exists(p.pid) or psutil.Process(p.pid).status() == psutil.STATUS_ZOMBIE
    (tmp_path / "timing.json").write_text(json.dumps({"seconds": seconds}))
    print(f"flower deployment, 2 rounds: {seconds:.1f} s")
