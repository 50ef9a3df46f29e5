"""Exact bytes a client uploads and downloads per round, for every method and head policy, from the manifests.

    python benchmarks/communication.py [--recipe quickstart] [--set key=value ...] [--dir /tmp/fedlora-bench-comm] [--json f]

For each configuration: `fedlora init`, then one `fedlora train-client` round of a single local step (the sizes
do not depend on the steps), through the CLI. Upload is the client update's tensor file as its manifest records
it (`bytes`, plus the manifest itself); download is the global checkpoint folder a client fetches each round
(the PEFT adapter, its config and the fedlora manifest). The ratio column compares uploads with FedAvg-LoRA's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent
CONFIGS = [
    {"federation.method": "fedavg", "federation.head": "shared"},
    {"federation.method": "ffa", "federation.head": "shared"},
    {"federation.method": "fedsa", "federation.head": "shared"},
    {"federation.method": "fedsa", "federation.head": "local"},
    {"federation.method": "ffa", "federation.head": "frozen"},
]


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def fedlora(*args: str) -> None:
    proc = subprocess.run([str(BIN / "fedlora"), *args], capture_output=True, text=True,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    if proc.returncode != 0:
        sys.exit(f"fedlora {' '.join(args)} failed: {proc.stderr.strip()[-1000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="quickstart")
    parser.add_argument("--set", "-s", action="append", default=[], help="extra recipe override for every row")
    parser.add_argument("--dir", default="/tmp/fedlora-bench-comm")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    fedlora("partition", "--recipe", args.recipe, "-o", str(root / "data"))
    rows = []
    for i, config in enumerate(CONFIGS):
        run = root / f"config-{i}"
        sets = [f"{k}={v}" for k, v in config.items()] + ["training.local_steps=1", *args.set]
        fedlora("init", args.recipe, "--data", str(root / "data"), "-o", str(run / "global"),
                *[x for s in sets for x in ("--set", s)])
        fedlora("train-client", str(run / "global"), "--data", str(root / "data" / "client-0.parquet"),
                "--state", str(run / "state"), "--out", str(run / "update"), "--client-id", "client-0")
        manifest = json.loads((run / "update" / "update.json").read_text())
        state = next((run / "state").glob("round-*"))
        rows.append({
            **config,
            "sent_tensors": len(manifest["tensor_digests"]),
            "upload_tensor_bytes": manifest["bytes"],
            "upload_bytes": folder_bytes(run / "update"),
            "download_bytes": folder_bytes(run / "global"),
            "kept_bytes": folder_bytes(state),
        })
    base = rows[0]["upload_bytes"]
    print(f"# bytes per client per round, recipe {args.recipe} {' '.join(args.set)}, {time.strftime('%Y-%m-%d')}")
    print("| method | head | tensors sent | upload bytes (tensors) | upload bytes (folder) | x FedAvg-LoRA | download bytes | kept at client |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['federation.method']} | {r['federation.head']} | {r['sent_tensors']} | {r['upload_tensor_bytes']:,} | "
              f"{r['upload_bytes']:,} | {r['upload_bytes'] / base:.2f} | {r['download_bytes']:,} | {r['kept_bytes']:,} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "recipe": args.recipe, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
