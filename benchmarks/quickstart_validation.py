"""The quickstart beside a centralised LoRA run of equal compute, on the validation and the test split.

    python benchmarks/quickstart_validation.py [--seeds 0] [--set key=value ...] [--no-centralised]
                                               [--out runs/bench-quickstart] [--json f]

Each seed runs ``fedlora simulate quickstart`` (with the ``--set`` overrides: the candidate settings) and, unless
``--no-centralised``, the centralised reference of ``quality.py`` (plain LoRA at FedAvg-LoRA's rate on one client
holding all the training rows, IID, 160 steps a round for 3 rounds: the federation's 4 x 40 steps), both with the
recipe's pooling (``auto``: MiniLM's mean). It prints, per run, the global model's validation and test accuracy
after every round, the simulation's wall time and the machine's load average when it ended: settings are to be
chosen on the validation column only, the test column is the estimate reported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import CENTRALISED  # noqa: E402
from variants_quality import Quiet  # noqa: E402


def run(name: str, overrides: dict, out: Path) -> dict:
    from fedlora_cli import recipe as recipes
    from fedlora_cli.federation import simulate
    from fedlora_cli.recipe import catalog

    recipe = recipes.load(catalog.find("quickstart"), overrides)
    started = time.perf_counter()
    rows = simulate.simulate(recipe, out, Quiet(), overwrite=True)
    seconds = time.perf_counter() - started
    result = {"name": name, "overrides": overrides, "seconds": round(seconds, 1), "load": os.getloadavg(),
              "validation": [r["validation_global_accuracy"] for r in rows],
              "test": [r["global_accuracy"] for r in rows], "test_macro_f1": rows[-1]["global_macro_f1"]}
    print(f"{name}: validation {result['validation']}, test {result['test']}, {seconds:.0f} s, "
          f"load {result['load'][0]:.1f}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--set", action="append", default=[], dest="sets")
    parser.add_argument("--no-centralised", action="store_true")
    parser.add_argument("--out", default="runs/bench-quickstart")
    parser.add_argument("--json")
    args = parser.parse_args()
    from fedlora_cli import recipe as recipes

    extra = dict(recipes.parse_override(item) for item in args.sets)
    results = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        seeded = {"data.seed": seed, "training.seed": seed}
        results.append(run(f"quickstart seed {seed}", {**extra, **seeded}, Path(args.out) / f"quickstart-s{seed}"))
        if not args.no_centralised:
            results.append(run(f"centralised seed {seed}", {**CENTRALISED, **seeded},
                               Path(args.out) / f"centralised-s{seed}"))
    print(f"\n# Quickstart vs centralised, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.node()}")
    print("| run | validation by round | test by round | wall s | load (1 min) |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['name']} | {' / '.join(f'{v:.4f}' for v in r['validation'])} | "
              f"{' / '.join(f'{v:.4f}' for v in r['test'])} | {r['seconds']:.0f} | {r['load'][0]:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "machine": platform.node(),
                                               "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
