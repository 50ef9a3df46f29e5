"""The quality table: every method and variant x partition x privacy, over seeds, beside a centralised reference.

    python benchmarks/quality.py [--configs fedavg-lora,ffa-lora,fedsa-lora] [--partitions iid,dirichlet-0.5,dirichlet-0.1]
                                 [--privacy none,3] [--seeds 0,1,2] [--no-centralised] [--rate CONFIG=LR ...]
                                 [--set key=value ...] [--out runs/bench-quality] [--json f]
    python benchmarks/quality.py --summarise a.json b.json ...   # one table over runs made in parallel lanes

Every cell is ``fedlora simulate`` on the quickstart recipe (real MiniLM, Rotten Tomatoes, 4 clients,
3 rounds of 40 local steps of batch 32) with the configuration's overrides (the configurations of
``variants_quality.py``), the partition, and a seed that sets both the partition and the training seed.
Privacy ``3`` adds DP-SGD at epsilon 3 (delta 1e-5, C = 1, PRV; configurations that cannot run under DP,
such as VeRA, are reported as refused). The centralised reference trains plain LoRA (FedAvg-LoRA's rate) on
one client holding all the training data, IID, for the same compute: 4 x 40 steps a round for 3 rounds.
Cells report the mean over seeds and, with more than one seed, the range (min-max), for the test split and,
beside it, the validation split: rates (``--rate``) are to be chosen on the validation columns only. Global
accuracy is the aggregated model's; personalised is the mean over clients of each client's own model (FedSA-LoRA:
the global A with the client's own B), on the whole split and re-weighted to the client's own label mix.

This is hours of CPU on a 2-core machine (about 10 minutes a cell); pick a slice with the options.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from variants_quality import CONFIGS, Quiet  # noqa: E402

PARTITIONS = {
    "iid": {"data.strategy": "iid"},
    "dirichlet-0.5": {"data.strategy": "dirichlet", "data.alpha": 0.5},
    "dirichlet-0.3": {"data.strategy": "dirichlet", "data.alpha": 0.3},
    "dirichlet-0.1": {"data.strategy": "dirichlet", "data.alpha": 0.1},
}
PRIVACY = {"none": {}, "3": {"privacy.target_epsilon": 3.0, "privacy.delta": 1e-5, "privacy.max_grad_norm": 1.0}}
CENTRALISED = {
    "federation.method": "fedavg", "training.lr": 0.001, "federation.clients": 1, "data.strategy": "iid",
    "training.local_steps": 160,
}


def run_cell(name: str, overrides: dict, out: Path) -> dict:
    from fedlora_cli import recipe as recipes
    from fedlora_cli.errors import FedloraError
    from fedlora_cli.federation import simulate
    from fedlora_cli.recipe import catalog as recipes_catalog

    print(f"{name} -> {out}", flush=True)
    started = time.perf_counter()
    try:
        recipe = recipes.load(recipes_catalog.find("quickstart"), overrides)
        rows = simulate.simulate(recipe, out, Quiet())
    except FedloraError as exc:
        print(f"  refused: {exc}", flush=True)
        return {"refused": str(exc)}
    return {
        "global": rows[-1]["global_accuracy"], "personalised": rows[-1]["personalised_accuracy"],
        "personalised_own_mix": rows[-1]["personalised_accuracy_own_mix"],
        "by_round": [r["global_accuracy"] for r in rows], "seconds": time.perf_counter() - started,
        # The validation split's scores (issue 29): settings are chosen on these, the test figures above reported.
        "validation": rows[-1].get("validation_global_accuracy"),
        "validation_by_round": [r.get("validation_global_accuracy") for r in rows],
        "validation_personalised": rows[-1].get("validation_personalised_accuracy"),
        "validation_personalised_own_mix": rows[-1].get("validation_personalised_accuracy_own_mix"),
        "personalised_by_round": [r["personalised_accuracy"] for r in rows],
        "validation_personalised_by_round": [r.get("validation_personalised_accuracy") for r in rows],
        "overrides": overrides,
        **global_on_own_mix(out, len(rows)),
    }


def global_on_own_mix(out: Path, round_: int) -> dict:
    """The global model scored as FedSA-LoRA's personalised models are: on the split reweighted to each client's
    label mix (from its class recalls), averaged over clients; the like-for-like figure beside personalised, own mix."""
    from fedlora_cli.model.evaluation import accuracy_on_mix

    metrics = json.loads((out / "metrics" / f"round-{round_:03d}.json").read_text())
    mixes = [c["label_counts"] for c in json.loads((out / "data" / "partition.json").read_text())["clients"]]

    def mean_over_clients(scores: dict | None) -> float | None:
        if scores is None:  # a run without a validation split (--set data.validation_fraction=0)
            return None
        values = [accuracy_on_mix(scores["class_recall"], mix) for mix in mixes]
        return None if None in values else statistics.fmean(values)

    # The floor on each client's own mix: a constant predictor of the client's majority class. Under strong skew it
    # is high (a client of 1,942 rotten and 5 fresh reviews), so a personalised model is judged against it too.
    majority = statistics.fmean(max(mix) / sum(mix) for mix in mixes)
    return {"global_own_mix": mean_over_clients(metrics["global"]),
            "validation_global_own_mix": mean_over_clients((metrics.get("validation") or {}).get("global")),
            "majority_own_mix": majority}


def save(path: str | None, seeds: list[int], cells: list[dict]) -> None:
    """Write the cells so far: a grid that runs for hours keeps what it finished if it is stopped."""
    if path:
        Path(path).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "machine": platform.node(),
                                          "seeds": seeds, "cells": cells}, indent=2) + "\n")


def summary(values: list[float | None]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.3f} (1 seed)"
    return f"{mean:.3f} ({min(values):.3f}-{max(values):.3f}, {len(values)} seeds)"


def table(cells: list[dict]) -> None:
    print("| configuration | partition | epsilon | rate | global: validation | global: test | global, own mix: test "
          "| personalised: validation | personalised: test | personalised, own mix: test | majority class, own mix |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for c in cells:
        refused = [r["refused"] for r in c["runs"] if "refused" in r]
        if refused:
            print(f"| {c['config']} | {c['partition']} | {c['privacy']} | | refused: {refused[0][:80]} | | | | | | |")
            continue
        runs = c["runs"]
        print(f"| {c['config']} | {c['partition']} | {c['privacy']} | {c.get('rate', '-')} "
              f"| {summary([r.get('validation') for r in runs])} | {summary([r['global'] for r in runs])} "
              f"| {summary([r.get('global_own_mix') for r in runs])} "
              f"| {summary([r.get('validation_personalised') for r in runs])} "
              f"| {summary([r['personalised'] for r in runs])} "
              f"| {summary([r['personalised_own_mix'] for r in runs])} "
              f"| {summary([r.get('majority_own_mix') for r in runs])} |")


def summarise(paths: list[str]) -> None:
    """Merge the cells of several result files (lanes run in parallel) by configuration, partition, privacy, rate."""
    merged: dict[tuple, dict] = {}
    for path in paths:
        for cell in json.loads(Path(path).read_text())["cells"]:
            key = (cell["config"], cell["partition"], cell["privacy"], cell.get("rate"))
            merged.setdefault(key, {**cell, "runs": []})["runs"].extend(cell["runs"])
    table(list(merged.values()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="fedavg-lora,ffa-lora,fedsa-lora")
    parser.add_argument("--partitions", default="iid,dirichlet-0.5,dirichlet-0.1")
    parser.add_argument("--privacy", default="none,3")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--no-centralised", action="store_true")
    parser.add_argument("--set", action="append", default=[], dest="sets",
                        help="recipe override applied last to every cell, e.g. federation.rounds=1 for a quick check")
    parser.add_argument("--out", default="runs/bench-quality")
    parser.add_argument("--rate", action="append", default=[], metavar="CONFIG=LR",
                        help="this configuration's learning rate instead of its default (choose it on validation)")
    parser.add_argument("--json")
    parser.add_argument("--summarise", nargs="+", metavar="JSON", help="print one table over these result files")
    args = parser.parse_args()
    if args.summarise:
        summarise(args.summarise)
        return
    from fedlora_cli import recipe as recipes

    rates = {name: float(lr) for name, _, lr in (item.partition("=") for item in args.rate)}
    unknown = [name for name in [*rates, *args.configs.split(",")] if name not in CONFIGS]
    if unknown:
        parser.error(f"unknown configuration {unknown[0]} (known: {', '.join(CONFIGS)})")

    seeds = [int(s) for s in args.seeds.split(",")]
    extra = dict(recipes.parse_override(item) for item in args.sets)
    cells: list[dict] = []
    if not args.no_centralised:
        runs = [run_cell("centralised", {**CENTRALISED, "data.seed": s, "training.seed": s, **extra},
                         Path(args.out) / f"centralised-s{s}") for s in seeds]
        cells.append({"config": "centralised LoRA", "partition": "-", "privacy": "none", "runs": runs})
        save(args.json, seeds, cells)
    for config in args.configs.split(","):
        for partition in args.partitions.split(","):
            for privacy in args.privacy.split(","):
                runs = []
                rate = rates.get(config, CONFIGS[config]["training.lr"])
                for s in seeds:
                    overrides = {**CONFIGS[config], "training.lr": rate, **PARTITIONS[partition], **PRIVACY[privacy],
                                 "data.seed": s, "training.seed": s, **extra}
                    runs.append(run_cell(f"{config} {partition} eps={privacy} lr={rate} seed={s}", overrides,
                                         Path(args.out) / f"{config}-{partition}-eps{privacy}-lr{rate}-s{s}"))
                cells.append({"config": config, "partition": partition, "privacy": privacy, "rate": rate,
                              "runs": runs})
                save(args.json, seeds, cells)

    print(f"\n# Quality, {time.strftime('%Y-%m-%d')}, {platform.machine()} python {platform.python_version()}, "
          f"seeds {args.seeds} (mean, min-max)")
    table(cells)

if __name__ == "__main__":
    main()
