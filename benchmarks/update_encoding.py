"""Upload bytes and accuracy of each update encoding (federation.update_encoding, issue 26): float32, bfloat16, int8.

    python benchmarks/update_encoding.py [--recipe quickstart] [--encodings int8,float32,bfloat16] [--seeds 0]
                                         [--set key=value ...] [--out runs/bench-encoding] [--json f]

Each cell is ``fedlora simulate`` of the recipe (default the quickstart: real MiniLM, Rotten Tomatoes, FFA-LoRA,
4 clients, 3 rounds of 40 local steps) with ``federation.update_encoding`` set, and a seed that sets both the
partition and the training seed. It reports the upload bytes per client per round (the encoded tensor file, as
each update's manifest records it) and the global accuracy on the test split after each round; nothing is chosen
on the test split. The cells run one after another, and the JSON is rewritten after each, so a cut-short run keeps
what finished.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from variants_quality import Quiet  # noqa: E402


def run_cell(recipe_name: str, encoding: str, seed: int, sets: dict, out: Path) -> dict:
    from fedlora_cli import recipe as recipes
    from fedlora_cli.federation import simulate
    from fedlora_cli.recipe import catalog

    overrides = {**sets, "federation.update_encoding": encoding, "data.seed": seed, "training.seed": seed}
    recipe = recipes.load(catalog.find(recipe_name), overrides)
    started = time.perf_counter()
    rows = simulate.simulate(recipe, out, Quiet())
    return {
        "encoding": encoding, "seed": seed,
        "upload_bytes_per_client": [r["upload_bytes_per_client"] for r in rows],
        "global_accuracy": [r["global_accuracy"] for r in rows],
        "seconds": round(time.perf_counter() - started, 1),
    }


def table(cells: list[dict]) -> str:
    base = {c["seed"]: c for c in cells if c["encoding"] == "float32"}
    lines = ["| encoding | seed | upload bytes per client per round | vs float32 | accuracy by round | final accuracy |",
             "|---|---|---|---|---|---|"]
    for c in cells:
        ref = base.get(c["seed"])
        ratio = f"{c['upload_bytes_per_client'][0] / ref['upload_bytes_per_client'][0]:.3f}" if ref else "-"
        by_round = ", ".join(f"{a:.4f}" for a in c["global_accuracy"])
        lines.append(f"| {c['encoding']} | {c['seed']} | {c['upload_bytes_per_client'][0]:,} | {ratio} | {by_round} "
                     f"| {c['global_accuracy'][-1]:.4f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="quickstart")
    parser.add_argument("--encodings", default="int8,float32,bfloat16")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--set", "-s", action="append", default=[], help="extra recipe override key=value")
    parser.add_argument("--out", default="runs/bench-encoding")
    parser.add_argument("--json", default="benchmarks/results/update_encoding.json")
    args = parser.parse_args()
    from fedlora_cli import recipe as recipes

    sets = dict(recipes.parse_override(s) for s in args.set)
    cells: list[dict] = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for encoding in args.encodings.split(","):
            print(f"{encoding}, seed {seed}", flush=True)
            cells.append(run_cell(args.recipe, encoding, seed, sets, Path(args.out) / f"{encoding}-seed{seed}"))
            result = {"recipe": args.recipe, "overrides": sets, "machine": platform.platform(), "cells": cells}
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(table(cells))


if __name__ == "__main__":
    main()
