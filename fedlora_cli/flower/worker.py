"""A site's resident worker: one long-lived process beside the SuperNode that holds the base model in memory and
does the site's work for every message of every round and run, so Flower's fresh ClientApp process per message
(flwr 1.42 runs one task per process) only relays (:mod:`.client_app`, over :mod:`.channel`).

Started with the SuperNode's own ``--node-config`` (``fedlora flower worker --node-config '...'``): the worker and the
ClientApp read the same site (client id, data, state folder, base path, device, precision), and every request
carries the SuperNode's node config, which the worker refuses if it differs from its own.

What it keeps between requests is the workbench (:class:`fedlora_cli.model.workbench.Workbench`: tokenizer, base
model and adapter) and nothing else. Each round starts from what the received global checkpoint and the client state
say, as a fresh ``fedlora train-client`` does (:func:`fedlora_cli.federation.client.train_client` on a given
workbench): the base-weight correction of exact aggregation is set, or every corrected layer restored to its base
weight, when the global has none; the adapter and head are loaded whole from the global and overlaid with the kept
tensors; ``local_train`` builds a new optimiser, seeds dropout and batching from the round's seed and gives the
process its random state back, leaves the model in eval mode with no gradient kept, and removes Opacus' hooks. So
the third round a worker trains is bit-identical to a fresh process's (tests/flower/test_worker.py).

A workbench is kept per what building it reads (the base's location, the recipe's model and adapter sections, the
initialisation seed, the label count, the rank and the site's effective settings): another federation on the same
base and adapter reuses it, anything else builds another. At most ``capacity`` are held (default 1: one copy of
the base model in memory); the least recently used is dropped first.

One request is worked on at a time (a lock): a second connection waits for the first to finish rather than be told
busy, because Flower gives a node's messages one by one and a busy answer would cost the federation the site's
round; the relay waits as long as training takes, and learns of a dead worker from the closed connection.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import socket
import socketserver
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fedlora_cli import recipe as recipes
from fedlora_cli.errors import FedloraError, first_line
from fedlora_cli.flower import channel, site as sites
from fedlora_cli.model.site import SITE_FLAGS, Site
from fedlora_cli.model.workbench import Workbench
from fedlora_cli.recipe.site_settings import THREADS

Log = Callable[[str], None]


def effective_site(site: sites.SiteConfig, recipe: recipes.Recipe) -> Site:
    """How this site loads and runs ``recipe``: the node config's settings over the recipe's own."""
    return Site.of(recipes.with_site(recipe, site.settings, SITE_FLAGS))


def bench_key(site: sites.SiteConfig, recipe: recipes.Recipe, num_labels: int | None, rank: int) -> str:
    """What building a workbench for ``recipe`` at this site reads: equal keys build bit-identical workbenches.
    The thread count is left out: it loads nothing, and :meth:`Benches.get` applies each request's own."""
    loaded = {k: v for k, v in effective_site(site, recipe).to_dict().items() if k != THREADS.name}
    key = {"base": site.base or recipe.model.base, "model": dataclasses.asdict(recipe.model),
           "adapter": dataclasses.asdict(recipe.adapter), "seed": recipe.training.seed, "num_labels": num_labels,
           "rank": rank, "site": loaded}
    return json.dumps(key, sort_keys=True, default=str)


class Benches:
    """The worker's workbenches, at most ``capacity``, least recently used dropped first; ``loads`` counts builds."""

    def __init__(self, capacity: int = 1) -> None:
        if capacity < 1:
            raise FedloraError(f"a site worker holds at least one workbench; got {capacity}")
        self.capacity = capacity
        self.loads = 0
        self._held: OrderedDict[str, Workbench] = OrderedDict()

    def get(self, site: sites.SiteConfig, recipe: recipes.Recipe, num_labels: int | None, rank: int) -> Workbench:
        from fedlora_cli.federation.common import build_for_site

        key = bench_key(site, recipe, num_labels, rank)
        if key in self._held:
            self._held.move_to_end(key)
            return _with_threads(self._held[key], effective_site(site, recipe).threads)
        while len(self._held) >= self.capacity:
            self._held.popitem(last=False)
            _release_memory()  # before the next base model is loaded, not beside it
        bench = build_for_site(recipe, num_labels, site.base, site.settings, rank)
        self.loads += 1
        self._held[key] = bench
        return bench

    def __len__(self) -> int:
        return len(self._held)

    def held(self) -> list[Workbench]:
        """The workbenches held now, least recently used first."""
        return list(self._held.values())


def _with_threads(bench: Workbench, threads: int) -> Workbench:
    """``bench`` computing with ``threads`` CPU threads (its site's thread context): the same loaded model."""
    if bench.site.threads == threads:
        return bench
    return dataclasses.replace(bench, site=dataclasses.replace(bench.site, threads=threads))


def _release_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Worker:
    """The site's work for one request at a time: :meth:`handle` takes a request (a JSON object, see
    :mod:`.channel`) and returns the answer; it never raises."""

    def __init__(self, site: sites.SiteConfig, benches: Benches | None = None, log: Log = print) -> None:
        self.site, self.log = site, log
        self.benches = benches if benches is not None else Benches()
        self.lock = threading.Lock()
        self.served = 0

    def handle(self, request: Mapping[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        started = time.perf_counter()
        with self.lock:
            try:
                self._check(request)
                result, what = getattr(self, str(op))(request)
            except FedloraError as exc:
                self.log(f"{self.site.client_id}: {op} refused in {time.perf_counter() - started:.1f} s: "
                         f"{first_line(exc)}")
                return {"error": first_line(exc)[:_MAX_ERROR]}  # it may quote the request: keep it to one frame
            except Exception as exc:  # noqa: BLE001 - one line to the relay, the worker serves on
                self.log(f"{self.site.client_id}: {op} failed: {exc.__class__.__name__}: {first_line(exc)}")
                if os.environ.get("FEDLORA_DEBUG"):
                    import traceback

                    traceback.print_exc()
                return {"error": f"the site worker failed: {exc.__class__.__name__}: {first_line(exc)[:_MAX_ERROR]}"}
            finally:
                self.served += 1
        self.log(f"{self.site.client_id}: {what} in {time.perf_counter() - started:.1f} s "
                 f"({self.benches.loads} base load(s) so far)")
        return {"ok": result}

    def _check(self, request: Mapping[str, Any]) -> None:
        if request.get("protocol") != channel.PROTOCOL:
            raise FedloraError(f"the relay speaks protocol {request.get('protocol')!r}, this worker "
                               f"{channel.PROTOCOL}: install the same fedlora for the SuperNode and the worker")
        if request.get("op") not in _OPS:
            raise FedloraError(f"unknown request {request.get('op')!r} (known: {', '.join(_OPS)})")
        config = request.get("node-config")
        theirs = sites.SiteConfig.from_node_config(config if isinstance(config, dict) else {})
        if theirs != self.site:
            field = next(f.name for f in dataclasses.fields(self.site)
                         if getattr(theirs, f.name) != getattr(self.site, f.name))
            raise FedloraError(f"this site worker was started with another --node-config than the SuperNode's "
                               f"({field} differs): restart it with the SuperNode's")

    def _received(self, request: Mapping[str, Any]):
        """The global checkpoint the relay unpacked into the site's work folder, checked to be the one it says."""
        from fedlora_cli.federation.common import Global

        round_, digest, federation = request.get("round"), request.get("digest"), request.get("federation")
        if not isinstance(round_, int) or isinstance(round_, bool) or round_ < 0 or not isinstance(digest, str):
            raise FedloraError("a train or evaluate request needs the received global's round and digest")
        folder = self.site.received(sites.check_federation(federation), round_)
        g = Global.of(folder)
        if (g.manifest.digest, g.manifest.round, sites.federation_folder(g.manifest)) != (digest, round_, federation):
            raise FedloraError(f"the global checkpoint in {folder} is not the one relayed")
        return g

    def bench(self, recipe: recipes.Recipe, num_labels: int | None, rank: int) -> Workbench:
        return self.benches.get(self.site, recipe, num_labels, rank)

    def query(self, request: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
        manifest = sites.manifest_of(str(request.get("manifest", "")))
        recipe = recipes.from_dict(manifest.recipe)
        # The base's files are fingerprinted without loading it (a site can be refused for its base, and need not
        # hold a model it will not train). A base that must be loaded to be identified is built at the rank this
        # client trains, so its first round reuses it.
        rank = recipe.adapter.rank_for(self.site.client_id)
        answer = sites.describe(self.site, manifest, lambda: self.bench(recipe, manifest.num_labels, rank))
        return answer, f"said who it is ({recipe.name})"

    def train(self, request: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
        g = self._received(request)
        recipe, r = g.recipe, g.manifest.round + 1
        bench = self.bench(recipe, g.manifest.num_labels, recipe.adapter.rank_for(self.site.client_id))
        done = sites.train(self.site, g, bench)
        what = "sent again" if done.resent else "trained"
        return {"resent": done.resent, "update": str(done.update.path)}, f"{what} round {r} ({recipe.name})"

    def evaluate(self, request: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
        g = self._received(request)
        metrics = sites.evaluate(self.site, g, lambda rank: self.bench(g.recipe, g.manifest.num_labels, rank))
        return {"metrics": metrics}, f"evaluated round {g.manifest.round} ({g.recipe.name})"


# An error answer's length: a message quoting a request of up to a frame (1 MB) could otherwise not be sent back.
_MAX_ERROR = 2000
# The requests a worker answers, each by its method of the same name.
_OPS = ("query", "train", "evaluate")


class _HungUp(FedloraError):
    """The other end connected and closed without a request."""


class _Handler(socketserver.StreamRequestHandler):
    """One connection: one request in, one answer out."""

    server: _Server

    def handle(self) -> None:
        uid = channel.peer_uid(self.connection)
        try:
            if uid is not None and uid != os.getuid():
                raise FedloraError(f"a process of uid {uid} connected; only uid {os.getuid()} is served")
            request = channel.read_frame(self.rfile, closed=_HungUp)
        except _HungUp:
            return  # a probe (is a worker listening?), not a request
        except FedloraError as exc:
            self.server.worker.log(f"{self.server.worker.site.client_id}: a connection refused: {first_line(exc)}")
            return
        answer = self.server.worker.handle(request)
        try:
            channel.write_frame(self.wfile, answer)
        except OSError:
            self.server.worker.log(f"{self.server.worker.site.client_id}: the relay hung up before the answer")


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    # Closing does not wait for a request in progress: run() decides whether to wait for it.
    block_on_close = False

    def __init__(self, path: Path, worker: Worker) -> None:
        self.worker = worker
        old = os.umask(0o177)  # the socket is born 0600, never for a moment open to others
        try:
            super().__init__(str(path), _Handler)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)


class Service:
    """A worker listening on its site's socket, served from a thread until :meth:`close`."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.path = channel.socket_path(worker.site.state_dir)
        channel.check_length(self.path)
        worker.site.state_dir.mkdir(parents=True, exist_ok=True)
        _clear_stale(self.path, worker.log)
        self._server = _Server(self.path, worker)
        self._inode = os.lstat(self.path).st_ino
        self._thread = threading.Thread(target=self._server.serve_forever, name="fedlora-worker", daemon=True)
        self._thread.start()

    def busy(self) -> bool:
        return self.worker.lock.locked()

    def close(self) -> None:
        """Stop taking connections and remove the socket (if it is still this worker's); a request being worked on
        goes on in its own thread."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
        try:
            if os.lstat(self.path).st_ino == self._inode:
                self.path.unlink()
        except FileNotFoundError:
            pass


def _clear_stale(path: Path, log: Log) -> None:
    """Remove the socket a killed worker left behind; refuse to replace anything else, or a live worker's."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise FedloraError(f"{path} exists and is not a socket; refusing to replace it")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink(missing_ok=True)
            log(f"removed the socket a stopped worker left at {path}")
            return
    raise FedloraError(f"a site worker already listens at {path}; stop it first")


def warm_imports() -> None:
    """Import what training needs now, once, rather than on the first request."""
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from fedlora_cli.federation import client, evaluate  # noqa: F401
    from fedlora_cli.model import evaluation, training  # noqa: F401


def parse_node_config(text: str) -> dict[str, Any]:
    """A ``--node-config`` value read exactly as flower-supernode reads it (Flower's own parser): TOML pairs,
    strings quoted, or the path of a .toml file."""
    import click
    from flwr.common.config import parse_config_args

    try:
        return dict(parse_config_args([text]))
    except (click.ClickException, ValueError, OSError) as exc:
        message = exc.format_message() if isinstance(exc, click.ClickException) else first_line(exc)
        raise FedloraError(f"--node-config: {message}") from None


def run(site: sites.SiteConfig, *, capacity: int = 1, log: Log = print) -> int:
    """Serve ``site`` until SIGTERM or SIGINT; returns the exit status. The first signal stops taking requests and
    lets the one being worked on finish (its relay gets its answer); a second one stops at once (that relay replies
    that the worker stopped). The socket is removed either way."""
    import signal

    signals: list[int] = []
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        signals.append(signum)
        stop.set()

    from fedlora_cli.model.site import resolve_device
    from fedlora_cli.recipe.site_settings import DEVICE

    log(f"{site.client_id}: loading torch, transformers and peft")
    warm_imports()
    if DEVICE.key in site.settings:
        resolve_device(str(site.settings[DEVICE.key]))  # a device this machine lacks is refused now, not in round 1
    service = Service(Worker(site, Benches(capacity), log))
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    log(f"{site.client_id}: serving at {service.path} (pid {os.getpid()}; the base model loads with the first "
        "request of a federation)")
    try:
        while not stop.wait(0.5):
            pass
        service.close()
        if service.busy():
            log(f"{site.client_id}: stopping after the request in progress (signal again to stop now)")
        while service.busy() and len(signals) < 2:
            time.sleep(0.2)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    interrupted = service.busy()
    log(f"{site.client_id}: stopped{' with a request unanswered' if interrupted else ''} "
        f"({service.worker.served} request(s) served, {service.worker.benches.loads} base load(s))")
    return 1 if interrupted else 0
