"""FedAvg-LoRA versus FFA-LoRA under DP-SGD: test accuracy at several privacy budgets, one run, side by side.

    python benchmarks/dp_quality.py [--recipe quickstart] [--epsilons none,3,1] [--methods fedavg,ffa]
                                    [--lr fedavg=0.001,ffa=0.005]
                                    [--strategies dirichlet,iid] [--seeds 0,1,2]
                                    [--set key=value ...] [--out runs/bench-dp] [--json f]
    python benchmarks/dp_quality.py --summarise a.json b.json ...   # one mean-and-spread table over runs

Every cell of the grid (partition strategy x epsilon x method x training seed) is one run; the training seed
draws the frozen A and the client-side shuffles (DP-SGD's own noise and Poisson samples always come from the
operating system's secure source). ``--summarise`` merges the JSON files of several invocations (run in
parallel, one per core) into one table of the mean and the spread (min-max) over seeds.

With ``--recipe ffa-lora-dp`` every run is that shipped recipe as it is (its shape, optimiser, pooling and data),
with only the method, rate, partition strategy, epsilon and seed of the cell changed: the table of issue 29 is
measured so. The default (``--recipe quickstart``) is the shape the earlier sections of RESULTS ran, below.

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
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import summary as spread  # noqa: E402  (one format for mean and range over seeds)
from variants_quality import Quiet  # noqa: E402

SHAPE = {
    "data.seed": 6, "federation.rounds": 3, "training.optimizer": "adamw", "training.batch_size": 64,
    "training.local_steps": 30, "adapter.target_modules": ["query", "value"],
}


def main() -> None:
    from fedlora_cli import recipe as recipes, storage
    from fedlora_cli.federation import simulate
    from fedlora_cli.recipe import catalog as recipes_catalog

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="quickstart",
                        help="base recipe; the SHAPE below is applied to the quickstart only")
    parser.add_argument("--epsilons", default="none,3,1")
    parser.add_argument("--methods", default="fedavg,ffa")
    parser.add_argument("--lr", default="fedavg=0.001,ffa=0.005", help="learning rate per method")
    parser.add_argument("--set", "-s", action="append", default=[], help="extra recipe override for every run")
    parser.add_argument("--out", default="runs/bench-dp")
    parser.add_argument("--strategies", default="dirichlet", help="data.strategy values: dirichlet, iid")
    parser.add_argument("--seeds", default="0", help="training.seed values")
    parser.add_argument("--json")
    parser.add_argument("--summarise", nargs="+", metavar="JSON", help="print one table over these result files")
    args = parser.parse_args()
    if args.summarise:
        summarise(args.summarise)
        return
    lrs = {m: float(v) for m, v in (item.split("=") for item in args.lr.split(","))}
    shape = dict(SHAPE if args.recipe == "quickstart" else {}, **dict(recipes.parse_override(item) for item in args.set))
    results = []
    grid = [(strategy, eps, method, seed) for strategy in args.strategies.split(",") for eps in args.epsilons.split(",")
            for method in args.methods.split(",") for seed in args.seeds.split(",")]
    for strategy, eps, method, seed in grid:
        overrides = dict(shape, **{"federation.method": method, "training.lr": lrs[method],
                                   "data.strategy": strategy, "training.seed": int(seed)})
        base = recipes.load(recipes_catalog.find(args.recipe)).to_dict()
        if eps == "none":
            base.pop("privacy", None)  # a DP base recipe trains without DP-SGD in this cell
        else:
            overrides.setdefault("privacy.max_grad_norm", 1.0)
            overrides.update({"privacy.target_epsilon": float(eps), "privacy.delta": 1e-5})
        recipe = recipes.override(base, overrides)
        rounds = recipe.federation.rounds
        run = Path(args.out) / f"{strategy}-{method}-lr{lrs[method]:g}-eps{eps}-seed{seed}"
        print(f"{strategy} {method} epsilon={eps} seed={seed} -> {run}", flush=True)
        started = time.perf_counter()
        rows = simulate.simulate(recipe, run, Quiet())
        seconds = time.perf_counter() - started
        manifest = storage.read_global(run / "global" / "round-000").manifest
        sigma = (manifest.recipe.get("privacy") or {}).get("noise_multiplier")
        # Each client's sigma as its ledger records it (they differ under privacy.calibration 'client').
        sigmas = {}
        for state_dir in storage.RunLayout(run).client_states():
            state = storage.latest_state(state_dir)
            if state is not None and state.manifest.privacy is not None:
                sigmas[state.manifest.client_id] = state.manifest.privacy["history"][-1][0]
        spent = None
        if eps != "none":
            spent = max(
                storage.read_update(update).manifest.privacy["epsilon"]
                for update in sorted((run / "updates" / storage.round_dirname(rounds)).iterdir())
            )
        results.append({
            "strategy": strategy, "data_seed": recipe.data.seed, "seed": int(seed), "method": method, "lr": lrs[method],
            "calibration": recipe.privacy.calibration if recipe.privacy is not None else None,
            "target_epsilon": None if eps == "none" else float(eps), "noise_multiplier": sigma,
            "client_noise_multipliers": sigmas, "epsilon_spent_max": spent,
            "accuracy_by_round": [r["global_accuracy"] for r in rows],
            "final_accuracy": rows[-1]["global_accuracy"], "final_macro_f1": rows[-1]["global_macro_f1"],
            "final_personalised_accuracy": rows[-1]["personalised_accuracy"],
            # The validation split's (issue 29): rates, alphas and round counts are chosen on these only.
            "validation_by_round": [r.get("validation_global_accuracy") for r in rows],
            "final_validation_personalised": rows[-1].get("validation_personalised_accuracy"),
            "seconds": seconds,
        })
        if args.json:  # after every run, so an interrupted benchmark keeps what it measured
            Path(args.json).write_text(json.dumps(
                {"date": time.strftime("%Y-%m-%d"), "recipe": args.recipe, "shape": shape, "results": results}, indent=2))
    print(f"\n# DP quality, {time.strftime('%Y-%m-%d')}, {platform.machine()} python {platform.python_version()}; {shape}")
    print("| method | lr | target eps | noise multiplier | eps spent (max client) | accuracy by round | final acc | final F1 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        by_round = " / ".join(f"{a:.3f}" for a in r["accuracy_by_round"])
        eps = "none" if r["target_epsilon"] is None else f"{r['target_epsilon']:g}"
        sigma = noise(r)
        spent = "-" if r["epsilon_spent_max"] is None else f"{r['epsilon_spent_max']:.3f}"
        print(f"| {r['method']} | {r['lr']:g} | {eps} | {sigma} | {spent} | {by_round} | {r['final_accuracy']:.4f} | {r['final_macro_f1']:.4f} |")


def summarise(paths: list[str]) -> None:
    """Mean and spread over seeds of each (partition, epsilon, method, rate, noise calibration) cell of several result
    files; a partition is its strategy and, where a result records it, its data seed."""
    cells: dict[tuple, list[dict]] = {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        for r in data["results"]:
            strategy = r.get("strategy") or data["shape"].get("data.strategy", "dirichlet")
            if r.get("data_seed") is not None:  # other data seeds are other partitions: never one cell
                strategy = f"{strategy} (data seed {r['data_seed']})"
            # One cell per noise calibration as well (a shared sigma, or each client's own).
            key = (strategy, r["target_epsilon"], r["method"], r["lr"], r.get("calibration") or "federation")
            cells.setdefault(key, []).append(r)

    def validation(rs: list[dict]) -> str:
        values = [r["validation_by_round"][-1] for r in rs if (r.get("validation_by_round") or [None])[-1] is not None]
        return spread(values) if values else "- (not recorded)"

    def at_best_round(rs: list[dict]) -> str:
        """Test accuracy at the round whose validation accuracy is highest (what ``export --round best`` exports):
        the privacy is spent for every round whichever is kept, so keeping an earlier one costs nothing more."""
        values = []
        for r in rs:
            val = r.get("validation_by_round") or []
            if val and None not in val:
                values.append(r["accuracy_by_round"][max(range(len(val)), key=val.__getitem__)])
        return spread(values) if values else "-"

    order = {"fedavg": 0, "ffa": 1, "fedsa": 2}
    print("| partition | target eps | method | rate | noise multiplier | global validation | global test, mean (min-max) "
          "| global test at the best validation round | personalised test |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (strategy, eps, method, lr, _), rs in sorted(
        cells.items(), key=lambda kv: (kv[0][0], -(kv[0][1] or 1e9), order.get(kv[0][2], 9), kv[0][3])
    ):
        personal = [r["final_personalised_accuracy"] for r in rs if r.get("final_personalised_accuracy") is not None]
        print(f"| {strategy} | {'none' if eps is None else f'{eps:g}'} | {method} | {lr:g} | "
              f"{noise(rs[0])} | {validation(rs)} | {spread([r['final_accuracy'] for r in rs])} | "
              f"{at_best_round(rs)} | "
              f"{spread(personal) if personal and method == 'fedsa' else '-'} |")


def noise(result: dict) -> str:
    """The run's noise multiplier: the federation's one, or the clients' range when each calibrated its own."""
    if result["noise_multiplier"] is not None:
        return f"{result['noise_multiplier']:.3f}"
    sigmas = list((result.get("client_noise_multipliers") or {}).values())
    if not sigmas:
        return "-"
    return f"{min(sigmas):.3f}-{max(sigmas):.3f} (per client)" if min(sigmas) != max(sigmas) else f"{sigmas[0]:.3f}"


if __name__ == "__main__":
    main()
