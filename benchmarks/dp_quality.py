"""FedAvg-LoRA versus FFA-LoRA under DP-SGD: test accuracy at several privacy budgets, one run, side by side.

    python benchmarks/dp_quality.py [--epsilons none,3,1] [--methods fedavg,ffa] [--lr fedavg=0.001,ffa=0.005]
                                    [--set key=value ...] [--out runs/bench-dp] [--json f]

Every run is ``fedlora simulate`` on the quickstart data (real MiniLM, Rotten Tomatoes, 4 clients,
Dirichlet(0.5)), 3 rounds of 30 local steps of batch 64 (Poisson-sampled under DP), LoRA r 8 on query and
value (the FFA-LoRA paper's targets), per-example clipping C = 1, delta 1e-5, the PRV accountant, AdamW at
a learning rate per method (FFA-LoRA wants several times LoRA's). Two shapes that learned nothing were tried
first and dropped: plain SGD at the paper's FFA rate (0.2) and AdamW at batch 128 with 10 local steps both
stayed at the constant predictor for 2 rounds, the first even without noise: 3 rounds of a handful of steps
is all this machine affords, so the shape needs enough steps to learn at all.
The partition seed is 6, whose smallest client holds 1,021 examples: with the default seed 0 one client
holds 29, which forces sample rate 1 and so a noise level no useful model survives (one noise multiplier
serves every client, calibrated for the worst one).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

SHAPE = {
    "data.seed": 6, "federation.rounds": 3, "training.optimizer": "adamw", "training.batch_size": 64,
    "training.local_steps": 30, "adapter.target_modules": ["query", "value"],
}


class Quiet:
    def stage(self, text): pass
    def training(self, round_, client_id): return None
    def done_training(self): pass
    def round_done(self, row): print(f"  round {row['round']}: global accuracy {row['global_accuracy']:.4f}", flush=True)


def main() -> None:
    from fedlora_cli import recipe as recipes, storage
    from fedlora_cli.federation import simulate
    from fedlora_cli.recipe import catalog as recipes_catalog

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilons", default="none,3,1")
    parser.add_argument("--methods", default="fedavg,ffa")
    parser.add_argument("--lr", default="fedavg=0.001,ffa=0.005", help="learning rate per method")
    parser.add_argument("--set", "-s", action="append", default=[], help="extra recipe override for every run")
    parser.add_argument("--out", default="runs/bench-dp")
    parser.add_argument("--json")
    args = parser.parse_args()
    lrs = {m: float(v) for m, v in (item.split("=") for item in args.lr.split(","))}
    shape = dict(SHAPE, **dict(recipes.parse_override(item) for item in args.set))
    rounds = shape["federation.rounds"]
    results = []
    for eps in args.epsilons.split(","):
        for method in args.methods.split(","):
            overrides = dict(shape, **{"federation.method": method, "training.lr": lrs[method]})
            if eps != "none":
                overrides.update({"privacy.target_epsilon": float(eps), "privacy.delta": 1e-5, "privacy.max_grad_norm": 1.0})
            recipe = recipes.load(recipes_catalog.find("quickstart"), overrides)
            run = Path(args.out) / f"{method}-eps{eps}"
            print(f"{method} epsilon={eps} -> {run}", flush=True)
            started = time.perf_counter()
            rows = simulate.simulate(recipe, run, Quiet())
            seconds = time.perf_counter() - started
            manifest = storage.read_global(run / "global" / "round-000").manifest
            sigma = (manifest.recipe.get("privacy") or {}).get("noise_multiplier")
            spent = None
            if eps != "none":
                spent = max(
                    storage.read_update(update).manifest.privacy["epsilon"]
                    for update in sorted((run / "updates" / storage.round_dirname(rounds)).iterdir())
                )
            results.append({
                "method": method, "lr": lrs[method], "target_epsilon": None if eps == "none" else float(eps), "noise_multiplier": sigma,
                "epsilon_spent_max": spent, "accuracy_by_round": [r["global_accuracy"] for r in rows],
                "final_accuracy": rows[-1]["global_accuracy"], "final_macro_f1": rows[-1]["global_macro_f1"],
                "seconds": seconds,
            })
            if args.json:  # after every run, so an interrupted benchmark keeps what it measured
                Path(args.json).write_text(json.dumps(
                    {"date": time.strftime("%Y-%m-%d"), "shape": shape, "results": results}, indent=2))
    print(f"\n# DP quality, {time.strftime('%Y-%m-%d')}, {platform.machine()} python {platform.python_version()}; {shape}")
    print("| method | lr | target eps | noise multiplier | eps spent (max client) | accuracy by round | final acc | final F1 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        by_round = " / ".join(f"{a:.3f}" for a in r["accuracy_by_round"])
        eps = "none" if r["target_epsilon"] is None else f"{r['target_epsilon']:g}"
        sigma = "-" if r["noise_multiplier"] is None else f"{r['noise_multiplier']:.3f}"
        spent = "-" if r["epsilon_spent_max"] is None else f"{r['epsilon_spent_max']:.3f}"
        print(f"| {r['method']} | {r['lr']:g} | {eps} | {sigma} | {spent} | {by_round} | {r['final_accuracy']:.4f} | {r['final_macro_f1']:.4f} |")


if __name__ == "__main__":
    main()
