"""Load held across real processes: a Flower deployment on this machine (127.0.0.1) with many SuperNodes, each with
its resident worker, a seeded half of the sites asked each round, and one asked site killed each round while its
update is in flight.

    python benchmarks/federation_load.py [--sites 20] [--rounds 3] [--steps 2] [--min-available-gb 6] [--json FILE]

The model is a tiny BERT built from a config (2 layers, 32 wide) on synthetic reviews, split iid: the load is the
processes and messages, not the model. Every process is started and ended by PID through the integration tests'
deployment (tests/integration/flower_deploy.py): a SuperLink, the sites' workers, then a SuperNode per site; the run
is ``flwr run`` of ``fedlora flower app``'s folder, its rounds those of the ServerApp. The workers run what
``fedlora flower worker`` runs, each in its own process, forked from one that imported torch once
(benchmarks/forked_workers.py): on one host, 20 separate imports would hold 20 copies of the libraries.

The kill: in each round, the first asked site still alive is SIGKILLed (its SuperNode, the ClientApp working on the
message, and its worker: the site's host gone) as soon as it has received the round's global checkpoint, so its
update is in flight; it stays dead, and a later round that asks it goes on without it. Measured, while the run goes:
each round's seconds (between the global checkpoints' writes), the peak resident memory of the coordinator (the
``flwr-serverapp`` process) and of the SuperLink in each round, from RSS sampled every 0.2 s; the ``flwr-clientapp``
processes Flower started in each round and the most alive at once (one per message delivered when nothing is
re-launched: flwr 1.42 gives a ClientApp 30 s from its launch to its first heartbeat and launches another one for
the same message when it is late, so on an overloaded host they pile up); the deployment's summed RSS and the
machine's least available memory. Below ``--min-available-gb`` the run is ended, every process by PID, rather than
left to the kernel's OOM killer.

Checked (``nothing lost``): the run completes with every round; each round's global aggregates exactly the asked
sites that were alive (the killed ones and only they are left out); every update in the run folder is in its global.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SAMPLE_SECONDS = 0.2


def tiny_federation(folder: Path, sites: int, rounds: int, steps: int) -> tuple[Path, Path]:
    """A tiny BERT, synthetic reviews partitioned iid over ``sites`` clients, and the recipe (half the sites asked a
    round); the recipe file and the partition folder."""
    import numpy as np
    import pandas as pd
    import torch
    import yaml
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    from fedlora_cli import recipe as recipes
    from fedlora_cli.data import partition

    good, bad = ["good", "great", "fine", "lovely"], ["bad", "awful", "dull", "boring"]
    filler = ["the", "movie", "film", "plot", "was", "a", "and", "story"]
    model = folder / "tiny-bert"
    model.mkdir(parents=True)
    (model / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *good, *bad, *filler]))
    BertTokenizerFast(vocab_file=str(model / "vocab.txt")).save_pretrained(model)
    torch.manual_seed(1234)
    BertForSequenceClassification(BertConfig(vocab_size=21, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                             intermediate_size=64, max_position_embeddings=64)).save_pretrained(model)
    rng = np.random.default_rng(7)
    rows = []
    for _ in range(40 * sites):
        label = int(rng.integers(2))
        rows.append({"text": " ".join([*rng.choice(filler, size=4), *rng.choice(good if label else bad, size=2)]),
                     "sentiment": "pos" if label else "neg"})
    pd.DataFrame(rows).to_csv(folder / "reviews.csv", index=False)
    raw = {
        "name": f"load-{sites}", "model": {"base": str(model)},
        "data": {"source": str(folder / "reviews.csv"), "text_column": "text", "label_column": "sentiment",
                 "labels": ["neg", "pos"], "strategy": "iid", "test_fraction": 0.2, "seed": 0, "max_length": 16},
        "adapter": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["query", "value"]},
        "federation": {"method": "fedavg", "rounds": rounds, "clients": sites, "clients_per_round": sites // 2},
        "training": {"optimizer": "adamw", "lr": 0.01, "local_steps": steps, "batch_size": 8, "seed": 0},
    }
    recipe_file = folder / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(raw))
    partition.partition(recipes.load(recipe_file).data, sites, folder / "data")
    return recipe_file, folder / "data"


@dataclass
class Watch:
    """What the watcher thread sees while the run goes: round boundaries, peak RSS per round, the ClientApp processes
    Flower starts, the kills; and the memory guard that ends the run before the machine runs out."""

    run: Path
    sites: dict[str, Path]  # client id -> state folder
    asked: dict[int, list[str]]  # round -> the clients it asks
    kill: object  # callable(client id): SIGKILL the site's processes
    min_available: int = 0  # bytes the machine must keep available, else the run is ended (0: no guard)
    round_started: dict[int, float] = field(default_factory=dict)
    coordinator_peak: dict[int, int] = field(default_factory=dict)  # round -> bytes
    superlink_peak: dict[int, int] = field(default_factory=dict)
    deployment_peak: dict[int, int] = field(default_factory=dict)  # round -> sum of RSS over the deployment's processes
    least_available: dict[int, int] = field(default_factory=dict)  # round -> the machine's least available memory
    clientapps_started: dict[int, set] = field(default_factory=dict)  # round -> PIDs of flwr-clientapp first seen then
    clientapps_alive_peak: dict[int, int] = field(default_factory=dict)  # round -> most alive at once
    killed: dict[int, str] = field(default_factory=dict)  # round -> client id
    killed_with_update_written: dict[int, bool] = field(default_factory=dict)
    aborted: str = ""  # why the guard ended the run
    stop: threading.Event = field(default_factory=threading.Event)

    def current_round(self) -> int:
        """The round being trained: one past the newest global checkpoint."""
        from fedlora_cli.storage.run_layout import RunLayout

        return len(RunLayout(self.run).global_checkpoints())

    def loop(self, coordinator_of, superlink, processes) -> None:
        """Every SAMPLE_SECONDS: the peaks of the round under way, the kill, the guard. ``processes()``: the
        deployment's processes (psutil) seen so far."""
        seen: set[int] = set()
        while not self.stop.wait(SAMPLE_SECONDS):
            r = self.current_round()
            self.round_started.setdefault(r, time.monotonic())
            for peaks, proc in ((self.coordinator_peak, coordinator_of()), (self.superlink_peak, superlink)):
                rss = _rss(proc)
                if rss:
                    peaks[r] = max(peaks.get(r, 0), rss)
            self.count(r, processes(), seen)
            if r >= 1 and r in self.asked and r not in self.killed:
                self.maybe_kill(r)
            if self.aborted:
                return

    def count(self, r: int, processes: list, seen: set[int]) -> None:
        """The deployment's memory and ClientApp processes in round ``r``; the guard."""
        import psutil

        from tests.integration.flower_deploy import running

        total, alive = 0, 0
        for proc in processes:
            if not running(proc):
                continue
            total += _rss(proc)
            if _is_clientapp(proc):
                alive += 1
                if proc.pid not in seen:
                    seen.add(proc.pid)
                    self.clientapps_started.setdefault(r, set()).add(proc.pid)
        self.deployment_peak[r] = max(self.deployment_peak.get(r, 0), total)
        self.clientapps_alive_peak[r] = max(self.clientapps_alive_peak.get(r, 0), alive)
        available = psutil.virtual_memory().available
        self.least_available[r] = min(self.least_available.get(r, available), available)
        if available < self.min_available:
            self.aborted = (f"the machine had {available / 2**30:.1f} GB available (guard: "
                            f"{self.min_available / 2**30:.1f} GB) in round {r}, with {alive} ClientApp processes "
                            f"alive; the run was ended")

    def maybe_kill(self, r: int) -> None:
        """Kill the first asked site still alive once it holds the round's global (its update is then in flight)."""
        from fedlora_cli.storage.checkpoints import round_dirname

        dead = set(self.killed.values())
        alive = [c for c in self.asked[r] if c not in dead]
        if not alive:
            return
        victim = alive[0]
        work = self.sites[victim] / "flower"  # WORK-DIR/<federation>/global and /updates
        if any(p.is_dir() for p in work.glob(f"*/global/{round_dirname(r - 1)}")):
            self.kill(victim)
            self.killed[r] = victim
            self.killed_with_update_written[r] = any(p.is_dir() for p in work.glob(f"*/updates/{round_dirname(r)}"))


def _is_clientapp(proc) -> bool:
    try:
        return any("flwr-clientapp" in part for part in proc.cmdline()[:2])
    except Exception:  # gone meanwhile
        return False


def _rss(proc) -> int:
    import psutil

    try:
        return proc.memory_info().rss if proc is not None else 0
    except psutil.Error:
        return 0


def run_load(folder: Path, sites: int, rounds: int, steps: int = 2, round_timeout: float = 300.0,
             say=lambda text: print(text, file=sys.stderr), min_available_gb: float = 0.0) -> dict:
    """Start the deployment, run the federation with one asked site killed per round, end every process; the
    measurements and what the run folder holds (see :func:`check`). ``min_available_gb``: the run is ended (every
    process by PID) as soon as the machine has less memory available than that, rather than let the kernel's OOM
    killer choose what dies."""
    from fedlora_cli import recipe as recipes
    from fedlora_cli.federation import sampling
    from fedlora_cli.flower.app_folder import write_app
    from fedlora_cli.storage.run_layout import RunLayout
    from tests.integration.flower_deploy import Deployment

    recipe_file, data = tiny_federation(folder, sites, rounds, steps)
    recipe = recipes.load(recipe_file)
    states = {f"client-{i}": folder / "sites" / f"client-{i}" for i in range(sites)}
    run = folder / "run"
    app = write_app(recipe_file, folder / "app", run, round_timeout=round_timeout).parent
    (folder / "deployment").mkdir()
    deployment = Deployment(folder / "deployment")
    asked = {r: sampling.asked(recipe.federation, recipe.training.seed, r) for r in range(1, rounds + 1)}
    watch = Watch(run, states, asked, kill=None, min_available=int(min_available_gb * 2**30))
    statuses, startup, total = [], None, None
    try:
        started = time.monotonic()
        link = deployment.superlink()
        watch.kill = start_sites(deployment, data, states, say)
        startup = time.monotonic() - started
        say(f"{sites} sites up (workers and SuperNodes) in {startup:.1f} s")
        watcher = threading.Thread(target=watch.loop, args=(lambda: coordinator(deployment), deployment.seen[link.pid],
                                                            lambda: list(deployment.seen.values())), daemon=True)
        watcher.start()
        ran = time.monotonic()
        statuses = finish(deployment, app, RunLayout(run), rounds, rounds * round_timeout + 600, watch)
        watch.stop.set()
        watcher.join(timeout=10)
        total = time.monotonic() - ran
    finally:
        deployment.end()
    result = {"sites": sites, "rounds": rounds, "asked_per_round": recipe.federation.clients_per_round,
              "local_steps": steps, "startup_seconds": startup and round(startup, 1),
              "run_seconds": total and round(total, 1), "statuses": statuses,
              "all_processes_ended": deployment.all_ended(), "aborted": watch.aborted, "killed": watch.killed,
              "killed_with_update_written": watch.killed_with_update_written,
              "clientapps_started": sum(len(p) for p in watch.clientapps_started.values())}
    result["rounds_table"] = rounds_of(run, watch, asked)
    result["lost"] = check(run, watch, asked, rounds)
    return result


def start_sites(deployment, data: Path, states: dict[str, Path], say):
    """A resident worker and a SuperNode per site, all online; returns kill(client id), which SIGKILLs the site's
    SuperNode, the processes it started (flower-superexec, the ClientApp) and its worker: its host gone."""
    from fedlora_cli.data.partition import shard_name
    from fedlora_cli.flower.app_folder import node_config
    from tests.integration.flower_deploy import send, wait_until

    configs = {cid: node_config(cid, str(data / shard_name(cid)), str(state), worker="required")
               for cid, state in states.items()}
    workers = forked_workers(deployment, configs, states)
    nodes = {cid: deployment.supernode(configs[cid], cid) for cid in configs}
    # Each look is a `flwr` process (a second of imports): every 3 s, not to slow the start it waits for.
    wait_until(lambda: online(deployment) == len(configs), 600, f"{len(configs)} SuperNodes were not online", every=3)

    def kill(cid: str) -> None:
        deployment.kill(nodes[cid])
        send(workers[cid], signal.SIGKILL)
        say(f"killed {cid}")

    return kill


def forked_workers(deployment, configs: dict[str, str], states: dict[str, Path]) -> dict:
    """Each site's resident worker, forked from one process that imported torch once (benchmarks/forked_workers.py:
    20 separate ``fedlora flower worker`` processes would hold 20 copies of the libraries); client id -> its worker
    (psutil.Process), once each listens on its socket."""
    import psutil

    from fedlora_cli.flower.channel import socket_path
    from tests.integration.flower_deploy import wait_until

    sites_file, pids_file = deployment.tmp / "sites.json", deployment.tmp / "worker-pids.json"
    sites_file.write_text(json.dumps(configs))
    parent = deployment.start("workers", "python", str(Path(__file__).resolve().parent / "forked_workers.py"),
                              str(sites_file), str(pids_file), str(deployment.logs))
    wait_until(lambda: pids_file.exists() or parent.poll() is not None, 600, "the site workers were never forked")
    assert parent.poll() is None, (deployment.logs / "workers.log").read_text()[-2000:]
    workers = {cid: psutil.Process(pid) for cid, pid in json.loads(pids_file.read_text()).items()}
    for proc in workers.values():
        deployment.seen[proc.pid] = proc  # ended by PID with the rest
    for cid, state in states.items():
        sock, proc = socket_path(state), workers[cid]
        wait_until(lambda: sock.exists() or not proc.is_running(), 600, f"{cid}'s worker never listened at {sock}")
        assert proc.is_running(), (deployment.logs / f"{cid}-worker.log").read_text()[-2000:]
    return workers


def finish(deployment, app: Path, layout, rounds: int, seconds: float, watch: Watch) -> list[str]:
    """Submit the run (``flwr run`` without --stream: a log stream breaks on a loaded machine) and wait for its last
    global checkpoint, or for the run to end without it, or for the memory guard; the runs' statuses once it has
    ended (none when the guard ended it: the deployment is ended next)."""
    from tests.integration.flower_deploy import run_id, wait_until

    done = deployment.flwr("run", str(app), "local", timeout=600)
    ours = run_id(done.stdout + done.stderr)
    looked = [0.0]

    def ended() -> bool:
        if layout.global_checkpoint(rounds).is_dir() or watch.aborted:
            return True
        if time.monotonic() - looked[0] < 60:  # `flwr list` is a process of its own: once a minute
            return False
        looked[0] = time.monotonic()
        return status_of(deployment, ours).startswith("finished")

    wait_until(ended, seconds, "the run never ended", every=2)
    if watch.aborted:
        return []
    wait_until(lambda: status_of(deployment, ours).startswith("finished"), 600, "the run was never finished", every=5)
    return [status_of(deployment, ours)]


def status_of(deployment, run: str) -> str:
    try:
        return deployment.status_by_run().get(run, "")
    except (AssertionError, subprocess.TimeoutExpired):  # no answer in time on a loaded machine
        return ""


def online(deployment) -> int:
    """How many SuperNodes the SuperLink counts online (0 while it cannot say: a slow answer on a loaded machine)."""
    try:
        listed = deployment.flwr("supernode", "list", "local", "--format", "json", timeout=120)
        return sum(node["status"] == "online" for node in json.loads(listed.stdout)["nodes"])
    except (subprocess.TimeoutExpired, ValueError, KeyError, TypeError):
        return 0


def coordinator(deployment):
    """The ServerApp process (``flwr-serverapp``) among the deployment's processes, once it runs."""
    from tests.integration.flower_deploy import running

    for proc in list(deployment.seen.values()):
        try:
            if running(proc) and any("flwr-serverapp" in part for part in proc.cmdline()):
                return proc
        except Exception:  # gone meanwhile
            continue
    return None


def rounds_of(run: Path, watch: Watch, asked: dict[int, list[str]]) -> list[dict]:
    """Per round: asked, aggregated, left out, killed, seconds, peak RSS (MB) of the coordinator and SuperLink, the
    ClientApp processes Flower started and the most alive at once, the deployment's summed RSS at its peak (shared
    pages counted in every process: an upper bound) and the least memory the machine had available."""
    from fedlora_cli import storage
    from fedlora_cli.storage.run_layout import RunLayout

    layout, rows = RunLayout(run), []
    for r in sorted(asked):
        path = layout.global_checkpoint(r)
        if not path.is_dir():
            break
        m = storage.read_global(path).manifest
        end = watch.round_started.get(r + 1)
        rows.append({"round": r, "asked": len(asked[r]), "aggregated": len(m.clients),
                     "left_out": sorted(set(asked[r]) - set(m.clients)), "killed": watch.killed.get(r),
                     "seconds": None if end is None or r not in watch.round_started
                     else round(end - watch.round_started[r], 1),
                     "coordinator_peak_mb": round(watch.coordinator_peak.get(r, 0) / 2**20, 1),
                     "superlink_peak_mb": round(watch.superlink_peak.get(r, 0) / 2**20, 1),
                     "clientapps_started": len(watch.clientapps_started.get(r, ())),
                     "clientapps_alive_peak": watch.clientapps_alive_peak.get(r, 0),
                     "deployment_rss_peak_gb": round(watch.deployment_peak.get(r, 0) / 2**30, 2),
                     "least_available_gb": round(watch.least_available.get(r, 0) / 2**30, 2)})
    return rows


def check(run: Path, watch: Watch, asked: dict[int, list[str]], rounds: int) -> list[str]:
    """What was lost: a round missing, a live asked site's update not aggregated, a killed site's aggregated, an
    update in the run folder that its global leaves out. Empty when nothing was."""
    from fedlora_cli import storage
    from fedlora_cli.storage.run_layout import RunLayout

    layout, lost = RunLayout(run), []
    for r in range(1, rounds + 1):
        path = layout.global_checkpoint(r)
        if not path.is_dir():
            lost.append(f"round {r} has no global checkpoint")
            continue
        dead = {cid for k, cid in watch.killed.items() if k <= r}
        expected = sorted(c for c in asked[r] if c not in dead)
        got = sorted(storage.read_global(path).manifest.clients)
        if got != expected:
            lost.append(f"round {r} aggregated {got}, expected the live asked sites {expected}")
        folder = layout.update(r, "x").parent
        stored = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        if stored != got:
            lost.append(f"round {r}: updates in the run folder {stored}, in the global {got}")
    if (run / ".staging").exists():
        lost.append("a staging folder was left")
    return lost


def table(result: dict) -> str:
    lines = ["| round | asked | aggregated | killed (in flight) | left out | seconds | coordinator peak RSS MB | "
             "SuperLink peak RSS MB | ClientApps started (most alive) | deployment RSS sum GB | least available GB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["rounds_table"]:
        lines.append(f"| {row['round']} | {row['asked']} | {row['aggregated']} | {row['killed'] or '-'} | "
                     f"{', '.join(row['left_out']) or '-'} | {row['seconds'] if row['seconds'] is not None else '-'} | "
                     f"{row['coordinator_peak_mb']} | {row['superlink_peak_mb']} | {row['clientapps_started']} "
                     f"({row['clientapps_alive_peak']}) | {row['deployment_rss_peak_gb']} | {row['least_available_gb']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="local steps a round (batch 8)")
    parser.add_argument("--round-timeout", type=float, default=300.0)
    parser.add_argument("--min-available-gb", type=float, default=6.0,
                        help="end the run (every process by PID) when the machine has less memory available")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    load_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="load-", dir="/tmp"))  # kept when the run fails, for its logs
    result = run_load(tmp, args.sites, args.rounds, args.steps, args.round_timeout,
                      min_available_gb=args.min_available_gb)
    if not result["lost"] and result["statuses"] == ["finished:completed"]:
        shutil.rmtree(tmp)
    uptime = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
              "machine": f"{os.cpu_count()} CPU cores, {platform.machine()}, Python {platform.python_version()}",
              "load_average_before": [round(x, 2) for x in load_before], "uptime_after": uptime, **result}
    print(table(result))
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    if result["lost"] or result["statuses"] != ["finished:completed"]:
        sys.exit(f"{result['aborted'] or 'not held'}; lost: {result['lost']}; statuses {result['statuses']}")


if __name__ == "__main__":
    main()
