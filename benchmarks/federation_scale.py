"""Federations of many sites: server optimisers under partial participation, and 100 clients against 10.

    python benchmarks/federation_scale.py optimisers [--seeds 0,1,2] [--rounds 2] [--local-steps 20] [--json f]
    python benchmarks/federation_scale.py scale [--rounds 2] [--local-steps 5] [--json f]

``optimisers``: the quickstart data (real MiniLM, Rotten Tomatoes) split over 20 clients by Dirichlet(0.5),
5 of them (25%) sampled each round (fixed-size), the quickstart's FFA-LoRA (FedAvg-LoRA at its rate learns
too slowly to tell the coordinators apart in a few rounds here). Four coordinators side by side, the same
seeds: plain FedAvg, FedAvgM (server momentum 0.9, eta 1), FedAdam
(eta 0.01, beta 0.9 / 0.99, tau 1e-3) and FedProx (mu 0.01, plain averaging). Reports the global test
accuracy after every round, mean and half-range over the seeds.

``scale``: the same data split 10 and 100 ways (IID: a Dirichlet split of 100 clients leaves some with too
few examples), 10 clients asked per round in both, so the per-round work is the same. Reports seconds per
round, the peak memory of one ``fedlora aggregate`` process over a round's 10 client updates (the
coordinator), the peak memory of the benchmark process so far (simulations run in turn), and the run
folder's growth per round (its size after each round, as the run leaves it) with and without
``--keep-state-rounds 1``.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import summary as spread  # noqa: E402  (mean ± half-range over seeds)
from variants_quality import Quiet  # noqa: E402

COORDINATORS = {
    "FedAvg": {},
    "FedAvgM": {"federation.server_optimizer": "fedavgm", "federation.server_momentum": 0.9},
    "FedAdam": {"federation.server_optimizer": "fedadam", "federation.server_lr": 0.01},
    "FedProx": {"training.proximal_mu": 0.01},
}
SAMPLED = {"federation.clients": 20, "federation.clients_per_round": 5, "data.strategy": "dirichlet",
           "data.alpha": 0.5, "federation.weighting": "shard"}


class Sizes(Quiet):
    """Records the run folder's size after every round (after pruning, as the run leaves it)."""

    def __init__(self, root: Path) -> None:
        self.root, self.bytes = root, []

    def round_done(self, row):
        super().round_done(row)
        self.bytes.append(sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file()))


def simulate(overrides: dict, out: Path, keep_state_rounds: int | None = None) -> tuple[list[dict], float, list[int]]:
    from fedlora_cli import recipe as recipes
    from fedlora_cli.federation import simulate as sim
    from fedlora_cli.recipe import catalog

    recipe = recipes.load(catalog.find("quickstart"), overrides)
    sizes = Sizes(out)
    started = time.perf_counter()
    rows = sim.simulate(recipe, out, sizes, overwrite=True, keep_state_rounds=keep_state_rounds)
    return rows, time.perf_counter() - started, sizes.bytes


def optimisers(args: argparse.Namespace) -> dict:
    seeds = [int(s) for s in args.seeds.split(",")]
    results: dict[str, list[list[float]]] = {}
    for name, extra in COORDINATORS.items():
        results[name] = []
        for seed in seeds:
            overrides = {**SAMPLED, **extra, "federation.rounds": args.rounds,
                         "training.local_steps": args.local_steps, "data.seed": seed, "training.seed": seed}
            print(f"{name} seed {seed}", flush=True)
            rows, _, _ = simulate(overrides, Path(args.out) / f"{name}-s{seed}")
            results[name].append([r["global_accuracy"] for r in rows])
            save(args.json, {"optimisers": results})
    print(f"\n# Server optimisers, {time.strftime('%Y-%m-%d')}, {platform.machine()}, seeds {args.seeds}: global test "
          "accuracy after each round (mean ± half-range)")
    print("| coordinator | " + " | ".join(f"round {r + 1}" for r in range(args.rounds)) + " |")
    print("|---|" + "---|" * args.rounds)
    for name, runs in results.items():
        cells = [spread([run[r] for run in runs]) for r in range(args.rounds)]
        print(f"| {name} | " + " | ".join(cells) + " |")
    return {"optimisers": results}


def scale(args: argparse.Namespace) -> dict:
    results = {}
    for clients in (10, 100):
        for keep in (None, 1):
            overrides = {"federation.clients": clients, "federation.clients_per_round": 10,
                         "data.strategy": "iid", "federation.rounds": args.rounds,
                         "training.local_steps": args.local_steps}
            out = Path(args.out) / f"scale-{clients}-keep{keep}"
            print(f"{clients} clients, keep {keep}", flush=True)
            rows, seconds, sizes = simulate(overrides, out, keep)
            results[f"{clients}-{keep}"] = {
                "clients": clients, "keep_state_rounds": keep, "seconds_per_round": seconds / args.rounds,
                "bytes_per_round": (sizes[-1] - sizes[0]) / max(1, args.rounds - 1),
                "aggregate_peak_mb": aggregate_peak_mb(out, args.rounds),
                # Peak of the benchmark process so far (it runs the configurations in turn, 10 clients first).
                "process_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "accuracy": rows[-1]["global_accuracy"],
            }
            save(args.json, {"scale": results})
    print(f"\n# Scale, {time.strftime('%Y-%m-%d')}, {platform.machine()}: 10 clients asked per round, "
          f"{args.local_steps} local steps, {args.rounds} rounds")
    print("| clients | keep-state-rounds | s / round | run folder growth / round | aggregate peak RSS | process peak RSS |")
    print("|---|---|---|---|---|---|")
    for r in results.values():
        print(f"| {r['clients']} | {r['keep_state_rounds'] or 'all'} | {r['seconds_per_round']:.1f} | "
              f"{r['bytes_per_round'] / 1e6:.2f} MB | {r['aggregate_peak_mb']:.0f} MB | {r['process_peak_mb']:.0f} MB |")
    return {"scale": results}


def aggregate_peak_mb(run: Path, round_: int) -> float:
    """Peak RSS of a separate ``fedlora aggregate`` of the round's updates (the coordinator's process)."""
    updates = sorted(str(p) for p in (run / "updates" / f"round-{round_:03d}").iterdir())
    out = run / "bench-aggregate"
    command = [sys.executable, "-m", "fedlora_cli", "aggregate", str(run / "global" / f"round-{round_ - 1:03d}"),
               *updates, "--out", str(out), "--overwrite", "--json"]
    # GNU time measures its own child, exec'd fresh: a child forked from this (large) process would count the
    # pages it shared with it before exec.
    report = run / "bench-aggregate.rss"
    done = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", str(report), *command], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"aggregate failed: {done.stderr[-500:]}")
    return int(report.read_text().split()[-1]) / 1024  # KB


def save(path: str | None, data: dict) -> None:
    if path:
        Path(path).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "machine": platform.node(),
                                          **data}, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["optimisers", "scale"])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--local-steps", type=int, default=None)
    parser.add_argument("--out", default="runs/bench-federation-scale")
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.what == "optimisers":
        args.rounds, args.local_steps = args.rounds or 2, args.local_steps or 20
        optimisers(args)
    else:
        args.rounds, args.local_steps = args.rounds or 2, args.local_steps or 5
        scale(args)


if __name__ == "__main__":
    main()
