"""What secure aggregation (federation.secure_aggregation, Flower's SecAgg+, issue 27) costs.

    python benchmarks/secagg.py protocol [--coordinates 578,203000,1000000] [--clients 3] [--json f]
    python benchmarks/secagg.py deployment [--rounds 2] [--json f]
    python benchmarks/secagg.py accuracy [--recipe quickstart] [--seeds 0,1,2] [--set key=value ...]
                                         [--out runs/bench-secagg] [--json f]

``protocol``: one round of Flower 1.42's real SecAgg+ (its workflow and client mod, keys, Shamir shares, masks) in
this process, the messages routed by a fake Grid (each node keeps its Flower state between messages, as a
SuperNode does), each site replying a random vector of the given size; no training, no network, no process
start-up. It reports the protocol's seconds (server and every site together, one core) and the bytes each site
uploads over the four stages (keys, encrypted shares, the masked int64 vector, the unmasking shares), against the
float32 tensors the same site uploads without SecAgg+ (4 bytes a coordinate). On a deployment each of the three
extra stages is also one more message to each site, hence one more ClientApp process start there (see RESULTS.md).

``deployment``: the same 3-site federation (the tests' tiny BERT, FFA-LoRA, a fresh ClientApp process per
message) on a real Flower deployment on 127.0.0.1, without and with SecAgg+: the seconds from one global checkpoint
to the next (the manifests' creation times), and the bytes each site's update took (the update file without,
SecAgg+'s four replies with, as the server counts them).

``accuracy``: ``fedlora simulate`` of the recipe with and without ``federation.secure_aggregation`` (simulate
emulates SecAgg+'s clip, quantisation and integer sum), per seed: the global accuracy after each round, and the
largest difference between the two runs' final global tensors. The quickstart weighs by shard, which secure
aggregation refuses, so both runs are set to ``federation.weighting: examples``.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path
from uuid import uuid4

import numpy as np

SECURE = {"num_shares": 3, "reconstruction_threshold": 2, "clipping_range": 1.0}


class _Grid:
    """Routes each message to an in-process ClientApp, each node with its own persistent Context."""

    def __init__(self, app, nodes: list[int]) -> None:
        from flwr.app import Context, RecordDict

        self.app = app
        self.contexts = {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={})
                         for n in nodes}
        self.up: dict[int, int] = dict.fromkeys(nodes, 0)

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        from fedlora_cli.flower.secure import payload_bytes

        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid4().hex
            node = msg.metadata.dst_node_id
            reply = self.app(copy.deepcopy(msg), self.contexts[node])
            self.up[node] += payload_bytes(reply.content)
            replies.append(reply)
        return replies


def protocol_cell(coordinates: int, clients: int) -> dict:
    from flwr.clientapp import ClientApp
    from flwr.client.mod import secaggplus_mod
    from flwr.supercore.task_identity import TaskIdentity

    from fedlora_cli.federation import secure
    from fedlora_cli.flower.secure import run_secagg, site_reply

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    rng = np.random.default_rng(0)
    vectors = {n: rng.uniform(-0.01, 0.01, coordinates) for n in range(101, 101 + clients)}
    app = ClientApp()

    @app.train(mods=[secaggplus_mod])
    def train(msg, context):
        from flwr.app import Message

        vector = secure.SiteVector(["t"], [vectors[msg.metadata.dst_node_id]], 1)
        return Message(site_reply(vector, {}), reply_to=msg)  # no counts: nothing clamped or clipped here

    grid = _Grid(app, list(vectors))
    arith = secure.Arithmetic(SECURE["clipping_range"], 1.0)
    started = time.perf_counter()
    capture, halted = run_secagg(grid, 1, list(vectors), {}, arith, SECURE["num_shares"],
                                 SECURE["reconstruction_threshold"], None)
    seconds = time.perf_counter() - started
    assert halted is None and capture.result is not None
    (mean,) = capture.result[0]
    err = float(np.max(np.abs(mean - np.mean(list(vectors.values()), axis=0))))
    up = max(grid.up.values())
    return {"coordinates": coordinates, "clients": clients, "seconds": round(seconds, 3),
            "upload_bytes_per_client": up, "float32_bytes": 4 * coordinates,
            "ratio": round(up / (4 * coordinates), 3), "max_error": err,
            "error_bound": arith.bound([1] * clients)}


def deployment_cell(secure_on: bool, rounds: int, root: Path) -> dict:
    """One federation on a real deployment; every process it starts is ended by its PID."""
    import yaml

    repo = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(repo))
    from tests.conftest import make_reviews, recipe_dict
    from tests.integration.flower_deploy import Deployment

    from fedlora_cli import recipe as recipes, storage
    from fedlora_cli.data import partition
    from fedlora_cli.data.partition import shard_name
    from fedlora_cli.flower.app_folder import node_config, write_app

    root.mkdir(parents=True)
    model, data = tiny_model(root / "model"), root / "reviews.csv"
    make_reviews(400, seed=7).to_csv(data, index=False)
    raw = recipe_dict(model, data, "ffa")
    raw["federation"]["rounds"] = rounds
    if secure_on:
        raw["federation"]["secure_aggregation"] = dict(SECURE)
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    partition.partition(recipes.load(recipe).data, 3, root / "data")
    app = write_app(recipe, root / "app", root / "run", round_timeout=600).parent
    deployment = Deployment(root)
    try:
        deployment.superlink()
        for cid in ("client-0", "client-1", "client-2"):
            deployment.supernode(node_config(cid, str(root / "data" / shard_name(cid)), str(root / "sites" / cid),
                                             worker="off"), cid)
        log = deployment.run(app, timeout=1800)
    finally:
        deployment.end()
    layout = storage.RunLayout(root / "run")
    created = [storage.read_global(p).manifest.created for p in layout.global_checkpoints()]
    assert len(created) == rounds + 1, log[-2000:]
    if secure_on:
        wire = [int(x) for x in _wire_bytes(log)]
        per_client = [w // 3 for w in wire]
    else:
        per_client = [sum(p.stat().st_size for p in layout.update(r, "client-0").rglob("*") if p.is_file())
                      for r in range(1, rounds + 1)]
    return {"secure": secure_on, "round_seconds": [round(b - a, 1) for a, b in zip(created, created[1:])],
            "bytes_per_client": per_client}


def _wire_bytes(log: str) -> list[str]:
    """What the server logs each round: the bytes of the sites' replies over the four SecAgg+ stages."""
    import re

    return re.findall(r"replies over the four SecAgg\+ stages took (\d+) bytes", log)


def tiny_model(path: Path) -> Path:
    """The tests' 2-layer, 32-wide BERT (tests/conftest.py's tiny_model_dir)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    from tests.conftest import FILLER, NEGATIVE, POSITIVE

    path.mkdir(parents=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *POSITIVE, *NEGATIVE, *FILLER]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(path / "vocab.txt")).save_pretrained(path)
    torch.manual_seed(1234)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertForSequenceClassification(config).save_pretrained(path)
    return path


def accuracy_cell(recipe_name: str, secure_on: bool, seed: int, sets: dict, out: Path) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from variants_quality import Quiet

    from fedlora_cli import recipe as recipes
    from fedlora_cli.federation import simulate
    from fedlora_cli.recipe import catalog

    overrides = {"federation.weighting": "examples", **sets, "data.seed": seed, "training.seed": seed}
    if secure_on:
        overrides["federation.secure_aggregation"] = dict(SECURE)
    recipe = recipes.load(catalog.find(recipe_name), overrides)
    started = time.perf_counter()
    rows = simulate.simulate(recipe, out, Quiet())
    return {"secure": secure_on, "seed": seed, "global_accuracy": [r["global_accuracy"] for r in rows],
            "seconds": round(time.perf_counter() - started, 1), "run": str(out)}


def final_difference(a: Path, b: Path) -> float:
    from fedlora_cli import storage

    ga, gb = storage.read_global(storage.RunLayout(a).global_checkpoints()[-1]), None
    gb = storage.read_global(storage.RunLayout(b).global_checkpoints()[-1])
    ta = storage.load_verified(ga.path / storage.ADAPTER_WEIGHTS, ga.manifest.tensor_digests, "a", framework="numpy")
    tb = storage.load_verified(gb.path / storage.ADAPTER_WEIGHTS, gb.manifest.tensor_digests, "b", framework="numpy")
    return max(float(np.max(np.abs(ta[n].astype(np.float64) - tb[n]))) for n in ta)


def machine() -> dict:
    import os

    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.platform(),
            "cpus": os.cpu_count(), "load": [round(x, 2) for x in os.getloadavg()]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["protocol", "deployment", "accuracy"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--coordinates", default="578,203000,1000000")
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--recipe", default="quickstart")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--set", action="append", default=[], help="recipe override key=value (repeatable)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-secagg"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result: dict = {**machine(), "part": args.part, "cells": []}
    if args.part == "protocol":
        print("| coordinates | clients | seconds | upload B per client | float32 B | ratio | max error | bound |")
        print("|---|---|---|---|---|---|---|---|")
        for d in (int(x) for x in args.coordinates.split(",")):
            c = protocol_cell(d, args.clients)
            result["cells"].append(c)
            print(f"| {d:,} | {c['clients']} | {c['seconds']:.2f} | {c['upload_bytes_per_client']:,} | "
                  f"{c['float32_bytes']:,} | {c['ratio']} | {c['max_error']:.2e} | {c['error_bound']:.2e} |")
            if args.json:
                args.json.write_text(json.dumps(result, indent=1))
        return
    if args.part == "deployment":
        import tempfile

        print("| SecAgg+ | seconds per round | bytes per client per round |")
        print("|---|---|---|")
        with tempfile.TemporaryDirectory() as tmp:
            for on in (False, True):
                c = deployment_cell(on, args.rounds, Path(tmp) / ("secure" if on else "plain"))
                result["cells"].append(c)
                print(f"| {'on' if on else 'off'} | {', '.join(map(str, c['round_seconds']))} | "
                      f"{', '.join(f'{b:,}' for b in c['bytes_per_client'])} |")
                if args.json:
                    args.json.write_text(json.dumps(result, indent=1))
        result.update(machine_after=machine())
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))
        return
    from fedlora_cli.recipe import parse_override

    sets = dict(parse_override(s) for s in args.set)
    print("| seed | plain accuracy by round | secure (emulated) by round | max final tensor difference |")
    print("|---|---|---|---|")
    for seed in (int(x) for x in args.seeds.split(",")):
        cells = [accuracy_cell(args.recipe, on, seed, sets, args.out / f"{'secure' if on else 'plain'}-{seed}")
                 for on in (False, True)]
        diff = final_difference(Path(cells[0]["run"]), Path(cells[1]["run"]))
        result["cells"].append({"seed": seed, "plain": cells[0], "secure": cells[1], "max_difference": diff})
        print(f"| {seed} | {', '.join(f'{a:.4f}' for a in cells[0]['global_accuracy'])} | "
              f"{', '.join(f'{a:.4f}' for a in cells[1]['global_accuracy'])} | {diff:.2e} |")
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
