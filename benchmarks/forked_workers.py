"""Many sites' resident workers on one host, forked from one process that imported torch, transformers and peft once
(benchmarks/federation_load.py starts it; not a fedlora command).

    python benchmarks/forked_workers.py SITES.json PIDS.json LOGS

SITES.json maps each client id to its SuperNode's ``--node-config`` string. Each site gets a process of its own that
runs exactly what ``fedlora flower worker --node-config ...`` runs (:func:`fedlora_cli.flower.worker.run` on the
site its node config describes), with its log in LOGS/<client id>-worker.log; PIDS.json (written once every site is
forked) maps each client id to its worker's PID, so one site's worker can be killed by PID.

Why fork: twenty ``fedlora flower worker`` processes each import the libraries on their own, about 330 MB of private
memory each before any model is loaded (7.2 GB for 20 sites here) and 20 imports competing for 2 cores at start. A
fork shares those pages (copy-on-write) and the import is paid once. What a site holds of its own (its model,
optimiser, data, the pages it writes) is still its own. One site per host, as a real federation runs, gains nothing
from this.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def serve(client_id: str, node_config: str, logs: Path) -> int:
    """In the forked child: the site's worker, as ``fedlora flower worker`` runs it, logging to its own file."""
    from fedlora_cli.flower import worker
    from fedlora_cli.flower.site import SiteConfig

    out = os.open(logs / f"{client_id}-worker.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(out)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)

    def log(line: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {line}", flush=True)

    site = SiteConfig.from_node_config(worker.parse_node_config(node_config))
    return worker.run(site, log=log)


def main() -> None:
    sites_file, pids_file, logs = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    sites = json.loads(sites_file.read_text())
    from fedlora_cli.flower import worker

    worker.warm_imports()  # once, before forking: the children share these pages
    gc.freeze()  # keep the collector from writing to (and so copying) every shared object in each child
    pids: dict[str, int] = {}
    for client_id, node_config in sites.items():
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            code = 1
            try:
                code = serve(client_id, node_config, logs)
            except BaseException as exc:  # noqa: BLE001 - the child must never return into the parent's loop
                print(f"{client_id}: worker failed: {exc!r}", file=sys.stderr, flush=True)
            finally:
                os._exit(code)
        pids[client_id] = pid
    tmp = pids_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(pids))
    tmp.rename(pids_file)
    # Stay until every child has ended (the deployment ends each by PID, and this process too).
    while pids:
        try:
            pid, _ = os.wait()
        except ChildProcessError:
            break
        pids = {c: p for c, p in pids.items() if p != pid}


if __name__ == "__main__":
    main()
