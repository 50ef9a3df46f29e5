"""What a resident site worker saves: seconds per Flower message with the ClientApp doing the work itself against
the ClientApp relaying to a warm worker (``fedlora flower worker``), and how often each site loads its base model.

    python benchmarks/worker_overhead.py [--models tiny,minilm] [--rounds 3] [--sites 2] [--steps 5] [--json FILE]

No SuperLink: the ServerApp's coordinator (:class:`fedlora_cli.flower.server_app.Coordinator`) drives the rounds over a
Grid that does what Flower 1.42 does with each message, start a fresh process that runs the ClientApp on it
(``flwr/supernode/runtime/run_clientapp.py`` serves one task per process). That process's wall time, interpreter
start and imports included, is the message's cost. Per site: one query, then a train and an evaluate message a round
(``client-evaluation``, on 200 test rows). Modes:

- ``itself``: no worker; every message's process imports torch and loads the base model (counted by wrapping the
  workbench builder in that process);
- ``worker``: each site runs ``fedlora flower worker`` (started, and waited for, before the run: its start-up is
  reported apart), the message's process only relays; base loads read from the worker's log as it stops.

Models: ``tiny`` (a 2-layer, 32-wide BERT built from a config, synthetic reviews) and ``minilm`` (the offline
all-MiniLM-L6-v2 of recipes/quickstart.yaml on its Rotten Tomatoes data, ``--steps`` local steps of batch 16).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.integration.flower_deploy import stop_worker  # noqa: E402  how the integration tests end a worker

# The ClientApp in a fresh process, on one message rebuilt from files (what Flower's SuperNode hands it).
CHILD = r'''
import json, sys
from pathlib import Path
job = json.loads(sys.argv[1])
loads = 0
if job["count_loads"]:
    from fedlora_cli.federation import common
    built = common.build
    def counted(*args, **kwargs):
        global loads
        loads += 1
        return built(*args, **kwargs)
    common.build = counted
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from fedlora_cli.flower import client_app, transport
TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 5, 1
if job["kind"] == "query":
    content = RecordDict({client_app.QUERY: ConfigRecord({client_app.MANIFEST_KEY: job["manifest"]})})
else:
    content = RecordDict(transport.pack(Path(job["global"]), client_app.GLOBAL))
msg = Message(content, 5, job["kind"])
msg.metadata.__dict__["_message_id"] = "m"
reply = client_app.app(msg, Context(run_id=1, node_id=5, node_config=job["node"], state=RecordDict(), run_config={}))
out = Path(job["out"])
if client_app.UPDATE + ".files" in reply.content:
    transport.unpack(reply.content, client_app.UPDATE, out / "update", overwrite=True)
metrics = reply.content.get(client_app.METRICS)
json.dump({"reply": dict(reply.content[client_app.REPLY]), "metrics": dict(metrics) if metrics else None,
           "loads": loads, "torch": "torch" in sys.modules}, open(out / "reply.json", "w"))
'''


def make_grid(nodes: dict[int, dict], work: Path, count_loads: bool):
    """A Grid whose every message runs the ClientApp in a fresh process; it records each message's seconds."""
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

    from fedlora_cli.flower import client_app, transport

    class ProcessGrid:
        def __init__(self):
            self.timings: list[dict] = []
            self.loads = {node: 0 for node in nodes}

        def get_node_ids(self):
            return list(nodes)

        def send_and_receive(self, messages, *, timeout=None):
            return [self.route(i, msg) for i, msg in enumerate(messages)]

        def route(self, i: int, msg):
            node, kind = msg.metadata.dst_node_id, msg.metadata.message_type
            msg.metadata.__dict__["_message_id"] = f"{kind}-{node}-{len(self.timings)}-{i}"
            out = Path(tempfile.mkdtemp(dir=work))
            job = {"kind": kind, "node": nodes[node], "out": str(out), "count_loads": count_loads}
            if kind == "query":
                job["manifest"] = str(msg.content[client_app.QUERY][client_app.MANIFEST_KEY])
            else:
                job["global"] = str(transport.unpack(msg.content, client_app.GLOBAL, out / "global"))
            started = time.perf_counter()
            done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(job)], capture_output=True, text=True,
                                  cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            seconds = time.perf_counter() - started
            if done.returncode != 0:
                raise RuntimeError(f"the ClientApp process failed: {done.stderr[-2000:]}")
            answer = json.loads((out / "reply.json").read_text())
            self.loads[node] += answer["loads"]
            self.timings.append({"node": node, "kind": kind, "seconds": round(seconds, 3), "torch": answer["torch"]})
            if "error" in answer["reply"]:
                raise RuntimeError(f"node {node} answered {kind} with: {answer['reply']['error']}")
            records = {client_app.REPLY: ConfigRecord(answer["reply"])}
            if (out / "update").is_dir():
                records.update(transport.pack(out / "update", client_app.UPDATE))
            if answer["metrics"] is not None:
                records[client_app.METRICS] = MetricRecord(answer["metrics"])
            return Message(RecordDict(records), reply_to=msg)

    return ProcessGrid()


def tiny_setup(folder: Path) -> tuple[dict, str]:
    """A tiny BERT built from a config and synthetic two-class reviews (as tests/conftest.py makes them)."""
    import numpy as np
    import pandas as pd
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    good, bad = ["good", "great", "fine", "lovely"], ["bad", "awful", "dull", "boring"]
    filler = ["the", "movie", "film", "plot", "was", "a", "and", "story"]
    model = folder / "tiny-bert"
    model.mkdir()
    (model / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *good, *bad, *filler]))
    BertTokenizerFast(vocab_file=str(model / "vocab.txt")).save_pretrained(model)
    config = BertConfig(vocab_size=21, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(1234)
    BertForSequenceClassification(config).save_pretrained(model)
    rng = np.random.default_rng(7)
    rows = []
    for _ in range(600):
        label = int(rng.integers(2))
        words = [*rng.choice(filler, size=4), *rng.choice(good if label else bad, size=2)]
        rows.append({"text": " ".join(words), "sentiment": "pos" if label else "neg"})
    pd.DataFrame(rows).to_csv(folder / "reviews.csv", index=False)
    raw = {
        "name": "tiny-worker-overhead", "model": {"base": str(model)},
        "data": {"source": str(folder / "reviews.csv"), "text_column": "text", "label_column": "sentiment",
                 "labels": ["neg", "pos"], "strategy": "iid", "test_fraction": 0.2, "seed": 0, "max_length": 16},
        "adapter": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["query", "value"]},
        "federation": {"method": "fedavg", "rounds": 3, "clients": 2},
        "training": {"optimizer": "adamw", "lr": 0.01, "local_steps": 5, "batch_size": 8, "seed": 0},
    }
    return raw, "tiny"


def minilm_setup(folder: Path, steps: int) -> tuple[dict, str]:
    """recipes/quickstart.yaml (offline MiniLM, Rotten Tomatoes), with ``steps`` local steps of batch 16."""
    import yaml

    raw = yaml.safe_load((ROOT / "recipes" / "quickstart.yaml").read_text())
    raw["training"].update(local_steps=steps, batch_size=16, gradient_accumulation_steps=1)
    return raw, "minilm"


def prepare(raw: dict, sites: int, rounds: int, folder: Path) -> tuple[dict[int, dict], Path]:
    """The partition (one shard per site, 200 test rows each site evaluates on) and the recipe file."""
    import pandas as pd
    import yaml

    from fedlora_cli import recipe as recipes
    from fedlora_cli.data import partition

    raw["federation"].update(rounds=rounds, clients=sites)
    recipe = recipes.from_dict(raw)
    data = folder / "data"
    partition.partition(recipe.data, sites, data)
    test = folder / "test-200.parquet"
    pd.read_parquet(data / partition.TEST_SHARD).head(200).to_parquet(test)
    (folder / "recipe.yaml").write_text(yaml.safe_dump(raw))
    nodes = {101 + i: {"client-id": f"client-{i}", "data": str(data / partition.shard_name(f"client-{i}")),
                       "state-dir": str(folder / f"s{i}"), "test-data": str(test)} for i in range(sites)}
    return nodes, folder / "recipe.yaml"


def start_worker(node: dict, log: Path) -> tuple[subprocess.Popen, float]:
    """``fedlora flower worker`` for ``node``, and the seconds until it listens."""
    from fedlora_cli.flower import channel

    text = " ".join(f"{key}={json.dumps(value)}" for key, value in node.items())
    started = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "fedlora_cli", "flower", "worker", "--node-config", text],
                                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
    path = channel.socket_path(Path(node["state-dir"]))
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the worker stopped: {log.read_text()[-2000:]}")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(path))
                return proc, time.perf_counter() - started
            except OSError:
                time.sleep(0.1)


def run_mode(raw: dict, mode: str, sites: int, rounds: int, folder: Path) -> dict:
    """One federation over the process Grid; per-message seconds, base loads per site, round seconds."""
    from fedlora_cli.flower import server_app

    folder.mkdir(parents=True)
    nodes, recipe_file = prepare(raw, sites, rounds, folder)
    for node in nodes.values():
        node["worker"] = "required" if mode == "worker" else "off"
    workers, startup = {}, {}
    try:
        if mode == "worker":
            for n, node in nodes.items():
                workers[n], startup[n] = start_worker(node, folder / f"worker-{n}.log")
        grid = make_grid(nodes, folder, count_loads=mode == "itself")
        config = {"recipe": str(recipe_file), "run-dir": str(folder / "run"), "client-evaluation": True,
                  "round-timeout": 3600.0, "query-timeout": 3600.0}
        rows = server_app.Coordinator(grid, server_app.Settings.from_run_config(config), lambda *a: None).run()
    finally:
        loads = {n: stop_worker(proc, folder / f"worker-{n}.log") for n, proc in workers.items()}
    if mode == "itself":
        loads = grid.loads
    return {"mode": mode, "messages": grid.timings, "base_loads": {nodes[n]["client-id"]: v for n, v in loads.items()},
            "worker_startup_seconds": {nodes[n]["client-id"]: round(v, 2) for n, v in startup.items()},
            "round_seconds": [round(row["wall_seconds"], 2) for row in rows],
            "relay_imported_torch": any(t["torch"] for t in grid.timings) if mode == "worker" else None}


def summary(result: dict) -> dict:
    """Mean seconds per message kind, and over all messages."""
    by_kind: dict[str, list[float]] = {}
    for t in result["messages"]:
        by_kind.setdefault(t["kind"], []).append(t["seconds"])
    means = {kind: round(sum(v) / len(v), 2) for kind, v in by_kind.items()}
    every = [t["seconds"] for t in result["messages"]]
    return {**means, "all": round(sum(every) / len(every), 2), "count": len(every)}


def table(results: list[dict]) -> str:
    lines = ["| model | mode | query s | train s | evaluate s | mean s/message | messages | base loads per site "
             "| round s | worker start s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        s = r["summary"]
        loads = ", ".join(str(v) for v in r["base_loads"].values())
        start = ", ".join(f"{v:.1f}" for v in r["worker_startup_seconds"].values()) or "-"
        lines.append(f"| {r['model']} | {r['mode']} | {s.get('query', '-')} | {s.get('train', '-')} | "
                     f"{s.get('evaluate', '-')} | {s['all']} | {s['count']} | {loads} | "
                     f"{' / '.join(f'{x:.1f}' for x in r['round_seconds'])} | {start} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny,minilm")
    parser.add_argument("--modes", default="itself,worker")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sites", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="MiniLM's local steps a round (batch 16)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from flwr.supercore.task_identity import TaskIdentity

    # What a ServerApp process is given by Flower, needed to build a Message.
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    results = []
    with tempfile.TemporaryDirectory(prefix="wo-", dir="/tmp") as tmp:
        for model in args.models.split(","):
            for mode in args.modes.split(","):
                folder = Path(tmp) / f"{model}-{mode}"
                folder.mkdir()
                raw, _ = tiny_setup(folder) if model == "tiny" else minilm_setup(folder, args.steps)
                started = time.perf_counter()
                result = run_mode(raw, mode, args.sites, args.rounds, folder / "fed")
                result.update(model=model, total_seconds=round(time.perf_counter() - started, 1))
                result["summary"] = summary(result)
                results.append(result)
                print(f"{model} {mode}: {result['summary']} loads {result['base_loads']}", file=sys.stderr)
    report = {"date": datetime.date.today().isoformat(), "machine": f"{os.cpu_count()} CPU cores, "
              f"{platform.machine()}, Python {platform.python_version()}", "rounds": args.rounds,
              "sites": args.sites, "results": results}
    print(table(results))
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
