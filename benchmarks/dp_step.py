"""Per-step time and peak memory of local training with and without DP-SGD, on the real offline MiniLM.

Each configuration runs in its own fresh process (so peak RSS is its own), alternating configurations over
several repeats; the table reports medians and the ratio to plain training measured in the same run.

    python benchmarks/dp_step.py [--repeats 3] [--steps 8] [--batch-size 32] [--json out.json]

Configurations: plain (fedlora's loop without DP), dp (Opacus per-example gradients via hooks, as
``train-client`` uses them), and ghost (Opacus' ghost clipping, reported as failed if it does not run).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time

CONFIGS = ("plain", "dp", "ghost")


def worker(config: str, steps: int, batch_size: int) -> dict:
    import resource

    import numpy as np
    import torch

    from fedlora_cli import recipe as recipes
    from fedlora_cli.adapters.methods import plan
    from fedlora_cli.data.examples import encode
    from fedlora_cli.data.sources import read_source
    from fedlora_cli.model.training import make_optimizer
    from fedlora_cli.model.workbench import build
    from fedlora_cli.recipe import catalog as recipes_catalog

    recipe = recipes.load(recipes_catalog.find("quickstart"), {"training.batch_size": batch_size})
    bench = build(recipe, 2)
    frame = read_source(recipe.data.source)
    frame = frame[frame["category"].isin(["fresh", "rotten"])].reset_index(drop=True)
    from fedlora_cli.data.examples import Examples

    examples = Examples(frame["text"].astype(str).tolist(), (frame["category"] == "fresh").to_numpy().astype(np.int64))
    params = bench.set_trainable(plan("ffa", "shared"))
    optimizer = make_optimizer(bench, params)
    model = bench.model
    model.train()
    rng = np.random.default_rng(0)
    batches = [rng.choice(len(examples), batch_size, replace=False) for _ in range(steps + 2)]

    if config == "plain":
        def step(batch):
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    elif config == "dp":
        from fedlora_cli.privacy.dp_sgd import DPSGD

        engine = DPSGD(model, optimizer, 1.0, 1.0, batch_size, seed=0)

        def step(batch):
            engine.module(**batch).loss.backward()
            engine.optimizer.step()
            engine.optimizer.zero_grad(set_to_none=True)
    else:
        from opacus.utils.fast_gradient_clipping_utils import (
            DPLossFastGradientClipping,
            DPOptimizerFastGradientClipping,
            GradSampleModuleFastGradientClipping,
        )

        module = GradSampleModuleFastGradientClipping(model, max_grad_norm=1.0, use_ghost_clipping=True)
        dp_optimizer = DPOptimizerFastGradientClipping(
            optimizer, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=batch_size
        )
        criterion = DPLossFastGradientClipping(module, dp_optimizer, torch.nn.CrossEntropyLoss(), loss_reduction="mean")

        def step(batch):
            labels = batch.pop("labels")
            logits = module(**batch).logits
            loss = criterion(logits, labels)
            loss.backward()
            dp_optimizer.step()
            dp_optimizer.zero_grad(set_to_none=True)

    import warnings

    warnings.filterwarnings("ignore")
    times = []
    for i, rows in enumerate(batches):
        batch = encode(bench.tokenizer, examples, rows, recipe.data.max_length)
        start = time.perf_counter()
        step(batch)
        if i >= 2:  # two warm-up steps
            times.append(time.perf_counter() - start)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"config": config, "step_seconds": statistics.median(times), "peak_rss_mb": peak_mb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--json", help="also write the raw results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.batch_size)))
        return
    runs: dict[str, list[dict]] = {c: [] for c in CONFIGS}
    failures: dict[str, str] = {}
    for _ in range(args.repeats):
        for config in CONFIGS:
            if config in failures:
                continue
            proc = subprocess.run(
                [sys.executable, __file__, "--worker", config, "--steps", str(args.steps), "--batch-size", str(args.batch_size)],
                capture_output=True, text=True,
            )
            if proc.returncode != 0:
                lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
                failures[config] = lines[-1] if lines else f"exit {proc.returncode}"
                continue
            runs[config].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    base = statistics.median(r["step_seconds"] for r in runs["plain"])
    base_mem = statistics.median(r["peak_rss_mb"] for r in runs["plain"])
    print(f"# DP-SGD step cost, MiniLM (quickstart recipe), batch {args.batch_size}, {args.steps} steps x {args.repeats} repeats")
    print(f"# {time.strftime('%Y-%m-%d')} on {platform.machine()}, {platform.processor() or 'cpu'}, python {platform.python_version()}")
    print("| config | step s (median) | x plain | peak RSS MB | x plain |")
    print("|---|---|---|---|---|")
    table = []
    for config in CONFIGS:
        if config in failures:
            print(f"| {config} | failed: {failures[config][:120]} | | | |")
            table.append({"config": config, "failed": failures[config]})
            continue
        t = statistics.median(r["step_seconds"] for r in runs[config])
        m = statistics.median(r["peak_rss_mb"] for r in runs[config])
        print(f"| {config} | {t:.3f} | {t / base:.2f} | {m:.0f} | {m / base_mem:.2f} |")
        table.append({"config": config, "step_seconds": t, "time_ratio": t / base, "peak_rss_mb": m, "memory_ratio": m / base_mem})
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"date": time.strftime("%Y-%m-%d"), "batch_size": args.batch_size, "rows": table, "raw": runs}, handle, indent=2)


if __name__ == "__main__":
    main()
