"""What a federation costs on Flower against ``fedlora simulate``: a real SuperLink and SuperNodes with resident site
workers on 127.0.0.1, and ``simulate`` of the same recipe on the same partition, back to back, per update encoding.

    python benchmarks/flower_overhead.py [--sites 3] [--rounds 3] [--steps 8] [--batch-size 16] [--accumulation 1]
                                         [--rows 2000] [--threads 0] [--site-threads N]
                                         [--encodings float32,bfloat16,int8] [--json FILE]

The recipe is the quickstart's (offline MiniLM, FFA-LoRA r=8 on query/key/value, Dirichlet(0.5) label skew, shard
weighting) made smaller so that the six runs take about a quarter of an hour on 2 cores: ``--rows`` reviews of its
Rotten Tomatoes corpus (a seeded sample; 20% are the test split the coordinator evaluates on each round),
``--sites`` clients, ``--steps`` local steps of ``--batch-size`` examples in ``--accumulation`` micro-batches
(the quickstart itself: ``--sites 4 --steps 40 --batch-size 32 --accumulation 4 --rows 20000``). Per encoding,
with the partition made once and copied into both run folders (so both train on the very same shards):

- ``flower``: ``flower-superlink``, one ``fedlora flower worker`` and one ``flower-supernode`` per site
  (tests/integration/flower_deploy.py starts them, and ends each by its PID), then ``flwr run``.
- ``simulate``: ``fedlora simulate`` in a fresh process.

Both train with the recipe's ``training.threads`` (``--threads``; default 0: each process's own count, all the
cores here): torch adds floats in another order with another thread count, so the globals are bit-identical only
when both paths compute with the same count (each update records the count it was made with; reported as
``threads``). With the default both paths use every core, the Flower sites at once (sites x cores threads on the
cores), and ``simulate`` one client after the other. ``--site-threads N`` gives each Flower site its own count instead
(its node config's ``threads``), as sites sharing a host would, to share the cores out (4 sites of 2 threads on 2
cores thrash: a quickstart-shaped round took 396 s on Flower); the globals then differ from simulate's in the last
bits, and the report says so.

Reported: seconds per round from each run folder's ``metrics/rounds.json`` (a round's wall time: sending,
training, collecting, aggregating, evaluating), round 1 apart from the later rounds (round 1 of Flower includes
asking each site who it is and its first model load); each run's whole wall time (Flower's from starting the
SuperLink); each site's base-model loads, as its worker counts them (its last log line, written when SIGTERM stops it);
per client and round the upload (its update folder) and download (the global checkpoint it was sent) in file bytes
and in Flower payload bytes (fedlora_cli.flower.transport.wire_bytes: every array's bytes and the JSON text; gRPC
framing and Flower's message metadata come on top); each round's test accuracy; and whether each Flower global
checkpoint is bit-identical to simulate's (same digest).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.integration.flower_deploy import BIN, Deployment, stop_worker  # noqa: E402  the deployment the integration tests run

QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
TARGET_LATER_RATIO, TARGET_INT8_UPLOAD = 1.25, 0.3


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def make_recipe(folder: Path, rows: int, sites: int, rounds: int, steps: int, threads: int = 0,
                batch_size: int = 16, accumulation: int = 1) -> dict:
    """The quickstart's recipe on a seeded sample of ``rows`` of its corpus (a CSV in ``folder``), smaller."""
    import yaml

    from fedlora_cli.data.sources import read_source

    raw = yaml.safe_load(QUICKSTART.read_text())
    corpus = read_source(raw["data"]["source"])
    corpus = corpus[corpus[raw["data"]["label_column"]].isin(raw["data"]["labels"])]
    sample = corpus.sample(n=min(rows, len(corpus)), random_state=0)
    sample[[raw["data"]["text_column"], raw["data"]["label_column"]]].to_csv(folder / "reviews.csv", index=False)
    raw["data"]["source"] = str(folder / "reviews.csv")
    raw["federation"].update(rounds=rounds, clients=sites)
    raw["training"].update(local_steps=steps, batch_size=batch_size, gradient_accumulation_steps=accumulation,
                           threads=threads)
    return raw


def recipe_for(raw: dict, encoding: str, folder: Path) -> Path:
    import yaml

    path = folder / f"recipe-{encoding}.yaml"
    raw = json.loads(json.dumps(raw))
    raw["name"] = f"flower-overhead-{encoding}"
    raw["federation"]["update_encoding"] = encoding
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def partition_once(recipe_file: Path, folder: Path) -> Path:
    from fedlora_cli import recipe as recipes
    from fedlora_cli.data import partition

    recipe = recipes.load(recipe_file)
    out = folder / "data"
    partition.partition(recipe.data, recipe.federation.clients, out, task=recipe.model.task)
    return out


def run_simulate(recipe_file: Path, data: Path, run: Path) -> dict:
    """``fedlora simulate`` in a fresh process on the partition ``data`` (copied into the run folder)."""
    shutil.copytree(data, run / "data")
    started = time.perf_counter()
    done = subprocess.run([str(BIN / "fedlora"), "simulate", str(recipe_file), "--out", str(run), "--json"],
                          capture_output=True, text=True, check=False, cwd=run.parent,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"})
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"simulate exited with status {done.returncode}: {done.stderr[-3000:]}")
    return {"total_seconds": round(seconds, 1), "base_loads": None}


def run_flower(recipe_file: Path, data: Path, folder: Path, sites: int, site_threads: int | None) -> dict:
    """A SuperLink, one worker and one SuperNode per site, ``flwr run``; every process ended by its PID."""
    from fedlora_cli.data.partition import shard_name
    from fedlora_cli.flower.app_folder import node_config, write_app

    folder.mkdir()
    run = folder / "run"
    shutil.copytree(data, run / "data")
    app = write_app(recipe_file, folder / "app", run, round_timeout=1800).parent
    clients = [f"client-{i}" for i in range(sites)]
    configs = {cid: node_config(cid, str(data / shard_name(cid)), str(folder / "sites" / cid), worker="required",
                                threads=site_threads) for cid in clients}
    deployment = Deployment(folder)
    started = time.perf_counter()
    try:
        deployment.superlink()
        workers = deployment.workers({cid: (configs[cid], folder / "sites" / cid) for cid in clients})
        for cid in clients:
            deployment.supernode(configs[cid], cid)
        log = deployment.run(app, timeout=3600)
        statuses = deployment.statuses()
        seconds = time.perf_counter() - started
        loads = {cid: stop_worker(p, deployment.logs / f"{cid}-worker.log") for cid, p in workers.items()}
    finally:
        deployment.end()
    if statuses != ["finished:completed"]:
        raise RuntimeError(f"the Flower run ended {statuses}: {log[-3000:]}")
    return {"total_seconds": round(seconds, 1), "base_loads": loads, "run": run}


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def payload_bytes(folder: Path, name: str) -> int:
    """The Flower payload a folder takes in a message, as the server app and the relay pack it."""
    from flwr.app import RecordDict

    from fedlora_cli.flower import transport

    return transport.wire_bytes(RecordDict(transport.pack(folder, name)), name)


def traffic(run: Path) -> list[dict]:
    """Per round and client: upload (its update) and download (the global it trained from), files and payload."""
    from fedlora_cli import storage
    from fedlora_cli.storage.run_layout import RunLayout

    layout = RunLayout(run)
    out = []
    for g in layout.global_checkpoints()[1:]:
        m = storage.read_global(g).manifest
        parent = layout.global_checkpoint(m.round - 1)
        for cid in m.clients:
            update = layout.update(m.round, cid)
            out.append({"round": m.round, "client": cid, "upload_file_bytes": folder_bytes(update),
                        "upload_payload_bytes": payload_bytes(update, "update"),
                        "upload_tensor_bytes": storage.read_update(update).manifest.bytes,
                        "download_file_bytes": folder_bytes(parent),
                        "download_payload_bytes": payload_bytes(parent, "global")})
    return out


def threads_of(run: Path) -> list[int]:
    """The torch thread counts the run's client updates were made with (each update's site record)."""
    from fedlora_cli import storage
    from fedlora_cli.storage.run_layout import RunLayout

    layout = RunLayout(run)
    found = {(storage.read_update(layout.update(storage.read_global(g).manifest.round, cid)).manifest.site or {})
             .get("threads") for g in layout.global_checkpoints()[1:] for cid in storage.read_global(g).manifest.clients}
    return sorted(found, key=str)


def rounds_of(run: Path) -> list[dict]:
    rows = json.loads((run / "metrics" / "rounds.json").read_text())
    return [{"round": r["round"], "seconds": r["wall_seconds"], "accuracy": r["global_accuracy"],
             "clients": r["clients"]} for r in rows]


def digests(run: Path) -> list[str]:
    from fedlora_cli import storage
    from fedlora_cli.storage.run_layout import RunLayout

    return [storage.read_global(g).manifest.digest for g in RunLayout(run).global_checkpoints()]


def summary(rows: list[dict]) -> dict:
    later = [r["seconds"] for r in rows[1:]]
    return {"round_1_seconds": rows[0]["seconds"], "later_round_seconds": round(sum(later) / len(later), 2),
            "final_accuracy": rows[-1]["accuracy"]}


def one_encoding(raw: dict, encoding: str, folder: Path, sites: int, site_threads: int | None) -> dict:
    recipe_file = recipe_for(raw, encoding, folder)
    data = partition_once(recipe_file, folder / encoding)
    print(f"{encoding}: flower ({uptime()})", file=sys.stderr)
    flower = run_flower(recipe_file, data, folder / encoding / "flower", sites, site_threads)
    print(f"{encoding}: simulate ({uptime()})", file=sys.stderr)
    sim_run = folder / encoding / "simulate"
    sim_run.mkdir()
    simulate = run_simulate(recipe_file, data, sim_run)
    result = {"encoding": encoding}
    for name, run, outcome in (("flower", flower.pop("run"), flower), ("simulate", sim_run, simulate)):
        rows = rounds_of(run)
        result[name] = {**outcome, "rounds": rows, **summary(rows), "traffic": traffic(run), "threads": threads_of(run)}
    result["flower_globals_identical_to_simulate"] = digests(flower_run_of(folder, encoding)) == digests(sim_run)
    result["later_rounds_ratio"] = round(result["flower"]["later_round_seconds"]
                                         / result["simulate"]["later_round_seconds"], 3)
    return result


def flower_run_of(folder: Path, encoding: str) -> Path:
    return folder / encoding / "flower" / "run"


def mean_upload(result: dict, key: str) -> float:
    rows = result["flower"]["traffic"]
    return sum(r[key] for r in rows) / len(rows)


def targets(results: list[dict]) -> dict:
    """The issue's targets, measured: later rounds against simulate, base loads, int8 upload against float32."""
    by = {r["encoding"]: r for r in results}
    out = {"later_rounds_at_most_1.25x_simulate": {r["encoding"]: r["later_rounds_ratio"] for r in results},
           "one_base_load_per_site": {r["encoding"]: r["flower"]["base_loads"] for r in results}}
    if "int8" in by and "float32" in by:
        out["int8_upload_over_float32"] = {
            key: round(mean_upload(by["int8"], key) / mean_upload(by["float32"], key), 3)
            for key in ("upload_file_bytes", "upload_payload_bytes", "upload_tensor_bytes")}
    return out


def table(results: list[dict]) -> str:
    lines = ["| encoding | run | round 1 s | later rounds s | total s | base loads | upload file B | upload payload B "
             "| download payload B | accuracy |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for name in ("flower", "simulate"):
            x = r[name]
            t = x["traffic"]
            up_file = sum(e["upload_file_bytes"] for e in t) // len(t)
            up_wire = sum(e["upload_payload_bytes"] for e in t) // len(t) if name == "flower" else "-"
            down = sum(e["download_payload_bytes"] for e in t) // len(t) if name == "flower" else "-"
            loads = ", ".join(str(v) for v in x["base_loads"].values()) if x["base_loads"] else "-"
            lines.append(f"| {r['encoding']} | {name} | {x['round_1_seconds']} | {x['later_round_seconds']} | "
                         f"{x['total_seconds']} | {loads} | {up_file} | {up_wire} | {down} | "
                         f"{x['final_accuracy']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="local steps a round")
    parser.add_argument("--batch-size", type=int, default=16, help="examples a local step")
    parser.add_argument("--accumulation", type=int, default=1, help="micro-batches a local step")
    parser.add_argument("--rows", type=int, default=2000, help="reviews sampled from the quickstart's corpus")
    parser.add_argument("--encodings", default="float32,bfloat16,int8")
    parser.add_argument("--threads", type=int, default=0,
                        help="the recipe's training.threads, for both paths (0: each process's own count)")
    parser.add_argument("--site-threads", type=int, help="each Flower site's own threads (its node config)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    before = uptime()
    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="fo-", dir="/tmp") as tmp:  # short: Unix socket paths
        raw = make_recipe(Path(tmp), args.rows, args.sites, args.rounds, args.steps, args.threads, args.batch_size,
                          args.accumulation)
        for encoding in args.encodings.split(","):
            results.append(one_encoding(raw, encoding, Path(tmp), args.sites, args.site_threads))
            print(table(results[-1:]), file=sys.stderr)
            write_report(args, before, results)  # after each encoding: a later failure keeps what was measured
    print(table(results))
    print(json.dumps(write_report(args, before, results), indent=1))


def write_report(args: argparse.Namespace, before: str, results: list[dict]) -> dict:
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
              "machine": f"{os.cpu_count()} CPU cores, {platform.machine()}, Python {platform.python_version()}",
              "load_before": before, "load_after": uptime(),
              "settings": {k: v for k, v in vars(args).items() if k != "json"}, "targets": targets(results),
              "results": results}
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
