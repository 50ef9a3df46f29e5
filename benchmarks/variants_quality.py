"""LoRA variants and aggregation strategies side by side: test accuracy (global and personalised) and upload.

    python benchmarks/variants_quality.py [--configs all] [--rounds 3] [--local-steps 40] [--out runs/bench-variants]
                                          [--set section.key=value ...] [--json f]

Every run is ``fedlora simulate`` on the quickstart recipe (real MiniLM, Rotten Tomatoes, 4 clients,
Dirichlet(0.5), shard weighting, q/k/v targets, shared head) with these overrides:

    fedavg-lora        FedAvg-LoRA (FedIT), AdamW lr 1e-3
    ffa-lora           FFA-LoRA, lr 5e-3 (FFA wants about 10x the LoRA rate; the quickstart's own setting)
    fedsa-lora         FedSA-LoRA, lr 1e-3
    fedsa-rslora       FedSA-LoRA with rsLoRA scaling alpha/sqrt(r) (16/sqrt(8) instead of 16/8), same lr 1e-3
    fedsa-vera         FedSA-VeRA, r 256, lr 5e-3 (VeRA trains only r + d values per layer)
    fedavg-svd         FedAvg-LoRA with svd aggregation (FlexLoRA), every client rank 8, lr 1e-3
    fedavg-svd-hetero  (not in 'all') svd with heterogeneous ranks 2, 4, 8, 8

Global accuracy is the global checkpoint on the shared test split; personalised accuracy is the mean over
clients of each client's own model (global plus what it keeps at home, or the global at its rank), reported
where the method has one, on the shared test split and reweighted to each client's own label mix. Upload is the client update's size in bytes per client per round (safetensors).
``--set`` applies the same recipe override to every configuration (e.g. ``--set data.test_fraction=0.02``
for a quick check).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

CONFIGS = {
    "fedavg-lora": {"federation.method": "fedavg", "training.lr": 0.001},
    "ffa-lora": {"federation.method": "ffa", "training.lr": 0.005},
    "fedsa-lora": {"federation.method": "fedsa", "training.lr": 0.001},
    "fedsa-rslora": {"federation.method": "fedsa", "adapter.kind": "rslora", "training.lr": 0.001},
    "fedsa-vera": {"federation.method": "fedsa", "adapter.kind": "vera", "adapter.r": 256, "training.lr": 0.005},
    "fedavg-svd": {"federation.method": "fedavg", "federation.aggregation": "svd", "training.lr": 0.001},
    "fedavg-svd-hetero": {
        "federation.method": "fedavg", "federation.aggregation": "svd", "training.lr": 0.001,
        "adapter.client_ranks": {"client-0": 2, "client-1": 4},
    },
}
DEFAULT = ["fedavg-lora", "ffa-lora", "fedsa-lora", "fedsa-rslora", "fedsa-vera", "fedavg-svd"]


class Quiet:
    def stage(self, text): pass
    def warn(self, text): print(f"  warning: {text}", flush=True)
    def training(self, round_, client_id): return None
    def done_training(self): pass

    def round_done(self, row):
        personal = row["personalised_accuracy"]
        extra = f", personalised {personal:.4f}" if personal is not None else ""
        print(f"  round {row['round']}: global accuracy {row['global_accuracy']:.4f}{extra}", flush=True)


def main() -> None:
    from fedlora_cli import recipe as recipes
    from fedlora_cli.federation import simulate
    from fedlora_cli.recipe import catalog as recipes_catalog

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="all", help=f"comma-separated, or 'all' ({', '.join(DEFAULT)})")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=None, help="default: the quickstart's (40)")
    parser.add_argument("--set", action="append", default=[], dest="sets", help="extra recipe override, repeatable")
    parser.add_argument("--out", default="runs/bench-variants")
    parser.add_argument("--json")
    args = parser.parse_args()
    names = DEFAULT if args.configs == "all" else args.configs.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown configuration {unknown[0]} (known: {', '.join(CONFIGS)})")
    extra = dict(recipes.parse_override(s) for s in args.sets)
    results = []
    for name in names:
        overrides = {**CONFIGS[name], "federation.rounds": args.rounds, **extra}
        if args.local_steps is not None:
            overrides["training.local_steps"] = args.local_steps
        recipe = recipes.load(recipes_catalog.find("quickstart"), overrides)
        run = Path(args.out) / name
        print(f"{name} -> {run}", flush=True)
        started = time.perf_counter()
        rows = simulate.simulate(recipe, run, Quiet())
        results.append({
            "config": name, "method": recipe.federation.method, "adapter_kind": recipe.adapter.kind,
            "rank": recipe.adapter.r, "aggregation": recipe.federation.aggregation, "lr": recipe.training.lr,
            "accuracy_by_round": [r["global_accuracy"] for r in rows],
            "final_accuracy": rows[-1]["global_accuracy"], "final_macro_f1": rows[-1]["global_macro_f1"],
            "final_personalised_accuracy": rows[-1]["personalised_accuracy"],
            "final_personalised_accuracy_own_mix": rows[-1].get("personalised_accuracy_own_mix"),
            "upload_bytes_per_client_per_round": sum(r["upload_bytes_per_client"] for r in rows) / len(rows),
            "seconds": time.perf_counter() - started,
        })
        if args.json:  # after every run, so an interrupted benchmark keeps what it measured
            Path(args.json).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "rounds": args.rounds,
                                                   "results": results}, indent=2))
    print(f"\n# LoRA variants and aggregation, {time.strftime('%Y-%m-%d')}, {platform.machine()} "
          f"python {platform.python_version()}, {args.rounds} rounds")
    print("| configuration | method | adapter | aggregation | lr | global accuracy by round | final global acc "
          "| final personalised acc | personalised acc, own label mix | upload per client per round |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        by_round = " / ".join(f"{a:.3f}" for a in r["accuracy_by_round"])
        personal = "-" if r["final_personalised_accuracy"] is None else f"{r['final_personalised_accuracy']:.4f}"
        own = r.get("final_personalised_accuracy_own_mix")
        own = "-" if own is None else f"{own:.4f}"
        adapter = f"{r['adapter_kind']} r={r['rank']}"
        upload = f"{r['upload_bytes_per_client_per_round'] / 1000:.1f} KB"
        print(f"| {r['config']} | {r['method']} | {adapter} | {r['aggregation']} | {r['lr']:g} | {by_round} "
              f"| {r['final_accuracy']:.4f} | {personal} | {own} | {upload} |")


if __name__ == "__main__":
    main()
