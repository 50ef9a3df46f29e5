"""A real Flower deployment on 127.0.0.1 for the integration tests: a SuperLink, SuperNodes and site workers on free
ports, with a temporary FLWR_HOME and each process's log in TMP/logs. :meth:`Deployment.end` ends every process it
started, and every process those started (flower-superexec, the ClientApp and ServerApp processes), by PID: a watcher
notes each descendant as it appears, so one whose parent has exited (a refused SuperNode's flower-superexec keeps
retrying for a while) is ended too."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[2]
INSECURE = ("--insecure",)


def state_of(state_dir: Path, layout) -> Path:
    """A site's client state folder (``state_dir`` its node config's) in the federation of the run ``layout``."""
    from fedlora_cli import storage
    from fedlora_cli.flower.site import federation_folder, manifest_of

    g0 = layout.global_checkpoint(0) / storage.GLOBAL_MANIFEST
    return Path(state_dir) / federation_folder(manifest_of(g0.read_text()))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check, seconds: float, what: str, every: float = 0.5) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if check():
            return
        time.sleep(every)
    raise AssertionError(f"{what} within {seconds:g} s")


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


def running(proc: psutil.Process) -> bool:
    """Whether ``proc`` (that very process: psutil checks its start time, so a reused PID is not it) still runs."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def send(proc: psutil.Process, signum: int) -> None:
    if running(proc):
        try:
            proc.send_signal(signum)
        except psutil.NoSuchProcess:  # it ended meanwhile
            pass


def stop_worker(p: subprocess.Popen, log: Path, timeout: float = 120) -> int | None:
    """SIGTERM a site worker (``fedlora flower worker``) by its PID and wait for it; the base-model loads its last
    log line reports ('stopped (N request(s) served, M base load(s))'), None when it wrote none."""
    p.send_signal(signal.SIGTERM)
    p.wait(timeout=timeout)
    found = re.findall(r"stopped .*?(\d+) base load\(s\)", Path(log).read_text())
    return int(found[-1]) if found else None


class Deployment:
    """A SuperLink and SuperNodes of one test, on 127.0.0.1, with their logs in TMP/logs; :meth:`end` ends them
    all by PID."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.home = tmp_path / "flwr-home"
        self.home.mkdir()
        self.link, self.health = free_port(), free_port()
        self.connect()
        self.env = {**os.environ, "FLWR_HOME": str(self.home), "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
                    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}  # flower-superexec is found on PATH
        self.logs = tmp_path / "logs"
        self.logs.mkdir()
        self.processes: list[subprocess.Popen] = []
        self.seen: dict[int, psutil.Process] = {}  # every process started here or by one of them, by PID
        self.watching = threading.Event()
        threading.Thread(target=self.watch, daemon=True).start()

    def connect(self, root_certificates: Path | None = None) -> None:
        """FLWR_HOME/config.toml: the connection 'local' to the SuperLink, over TLS trusting ``root_certificates``
        when given, else insecure."""
        how = f"root-certificates = {json.dumps(str(root_certificates))}" if root_certificates else "insecure = true"
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{self.link}"\n{how}\n'
        )

    def start(self, name: str, *args: str, home: Path | None = None, env: dict[str, str] | None = None
              ) -> subprocess.Popen:
        """Start ``args`` (a program of this venv), logging to logs/NAME.log; ``home``: its own FLWR_HOME; ``env``:
        variables set for it (and the processes it starts) beside the deployment's."""
        env = {**self.env, **(env or {}), **({} if home is None else {"FLWR_HOME": str(home)})}
        with open(self.logs / f"{name}.log", "w") as out:  # the child writes to its own copy
            p = subprocess.Popen([str(BIN / args[0]), *args[1:]], env=env, stdout=out, stderr=subprocess.STDOUT,
                                 cwd=self.tmp)
        self.processes.append(p)
        self.seen[p.pid] = psutil.Process(p.pid)
        return p

    def watch(self) -> None:
        """Note each descendant of the started processes as it appears, until :meth:`end`."""
        while not self.watching.wait(0.5):
            self.note_descendants()

    def note_descendants(self) -> None:
        """Note every running child of a process in ``seen``, recursively (one scan of the process table)."""
        children: dict[int, list[psutil.Process]] = {}
        for proc in psutil.process_iter(["ppid"]):
            children.setdefault(proc.info["ppid"], []).append(proc)
        stack = [pid for pid, proc in list(self.seen.items()) if running(proc)]
        while stack:
            for child in children.get(stack.pop(), []):
                if child.pid not in self.seen or not running(self.seen[child.pid]):
                    self.seen[child.pid] = child
                    stack.append(child.pid)

    def superlink(self, *security: str, name: str = "superlink", env: dict[str, str] | None = None
                  ) -> subprocess.Popen:
        """The SuperLink, ``security`` its TLS and authentication options (default ``--insecure``), ``env`` variables
        for it and its ServerApp processes; started again after a restart, it listens on the same port (the health
        check on a new one)."""
        self.health = free_port()
        p = self.start(name, "flower-superlink", *(security or INSECURE), "--host", "127.0.0.1", "--port",
                       str(self.link), "--disable-runtime-dependency-installation", "--health-server-address",
                       f"127.0.0.1:{self.health}", env=env)
        wait_until(lambda: listening(self.link) and listening(self.health), 60, "the SuperLink was not listening")
        return p

    def supernode(self, config: str, name: str, *security: str, home: Path | None = None,
                  env: dict[str, str] | None = None) -> subprocess.Popen:
        """A SuperNode, ``security`` its TLS and authentication options (default ``--insecure``), ``home`` its own
        FLWR_HOME (default the deployment's), ``env`` variables for it and the ClientApps it starts."""
        return self.start(name, "flower-supernode", *(security or INSECURE), "--superlink", f"127.0.0.1:{self.link}",
                          "--host", "127.0.0.1", "--port", str(free_port()), "--node-config", config, home=home,
                          env=env)

    def workers(self, sites: dict[str, tuple[str, Path]], seconds: float = 120, env: dict[str, str] | None = None
                ) -> dict[str, subprocess.Popen]:
        """A resident worker (``fedlora flower worker``) for each site, name -> (node config, state folder), started
        together (``env``: variables set for the workers alone); returns them, by name, once each listens on its
        socket (each given ``seconds`` to)."""
        from fedlora_cli.flower.channel import socket_path

        started = {name: self.start(f"{name}-worker", "fedlora", "flower", "worker", "--node-config", config, env=env)
                   for name, (config, _) in sites.items()}
        for name, (_, state_dir) in sites.items():
            p, sock = started[name], socket_path(state_dir)
            wait_until(lambda: sock.exists() or p.poll() is not None, seconds,
                       f"{name}'s worker never listened at {sock}")
            assert p.poll() is None, (self.logs / f"{name}-worker.log").read_text()[-2000:]
        return started

    def flwr(self, *args: str, timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "flwr"), *args], env=self.env, cwd=self.tmp, check=False,
                              capture_output=True, text=True, timeout=timeout)

    def run(self, app: Path, timeout: float = 420) -> str:
        """``flwr run APP --stream``: its output (the ServerApp's log), also kept in logs/flwr-run.log."""
        done = self.flwr("run", str(app), "local", "--stream", timeout=timeout)
        (self.logs / "flwr-run.log").write_text(done.stdout + done.stderr)
        return done.stdout + done.stderr

    def statuses(self) -> list[str]:
        """Each run's status as ``flwr list --format json`` gives it (``flwr run`` exits 0 even when the ServerApp
        fails)."""
        return list(self.status_by_run().values())

    def status_by_run(self) -> dict[str, str]:
        """Run id -> its status (``flwr list --format json``)."""
        listed = self.flwr("list", "local", "--format", "json", timeout=60)
        try:
            runs = json.loads(listed.stdout)["runs"]
            return {str(run["run-id"]): str(run["status"]).replace(" ", "") for run in runs}
        except (ValueError, KeyError, TypeError) as exc:
            raise AssertionError(f"flwr list gave no runs ({exc}): {listed.stdout} {listed.stderr}") from None


    def stop(self, p: subprocess.Popen) -> None:
        """SIGTERM one process started here, by its PID, and wait for it (its children are left to :meth:`end`)."""
        send(self.seen[p.pid], signal.SIGTERM)
        p.wait(timeout=60)

    def kill(self, p: subprocess.Popen) -> None:
        """SIGKILL a SuperNode and the processes it started (its flower-superexec and ClientApp): a site's host gone,
        with no goodbye to the SuperLink."""
        node = self.seen[p.pid]
        for proc in [node, *node.children(recursive=True)]:
            self.seen.setdefault(proc.pid, proc)
            send(proc, signal.SIGKILL)
        p.wait(timeout=10)

    def end(self) -> None:
        """SIGTERM every process started here and every descendant seen, by PID; SIGKILL whatever is left after 30 s."""
        self.watching.set()
        self.note_descendants()
        for proc in list(self.seen.values()):
            send(proc, signal.SIGTERM)
        deadline = time.monotonic() + 30
        for p in self.processes:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        while any(running(proc) for proc in self.seen.values()) and time.monotonic() < deadline:
            time.sleep(0.2)
        for proc in list(self.seen.values()):
            send(proc, signal.SIGKILL)
        for p in self.processes:
            p.wait(timeout=10)

    def all_ended(self) -> bool:
        return not any(running(proc) for proc in self.seen.values())


def run_id(output: str) -> str:
    """The run id ``flwr run`` printed ('Successfully started run N')."""
    found = re.search(r"Successfully started run (\d+)", output)
    assert found, output[-2000:]
    return found[1]
