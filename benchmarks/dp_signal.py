"""How much signal a DP-SGD step really carries: per-example gradients of what a client trains, measured.

    python benchmarks/dp_signal.py [--recipe quickstart] [--methods ffa,fedavg,fedsa] [--heads shared,frozen]
                                   [--examples 256] [--sigma 2.031] [--batch 1024] [--json f]

``fedlora privacy plan`` ranks plans by sigma sqrt(d) / B, which takes the averaged clipped gradient at its
largest norm, C. Whether a step learns depends on its real norm: per-example gradients that point different
ways cancel in the average. This script builds a client's model through fedlora's own workbench (the recipe's
base, adapter and head; the round-0 adapter: random A, zero B), computes the exact per-example gradient of the
coordinates the method trains for ``--examples`` examples of client-0's shard, and prints, per method and head
policy:

- d, the per-example gradient norms (10/50/90th percentiles) and the share of their squared norm in the head;
- for clipping norms C: the fraction of examples clipped and the alignment a = ||E clipped gradient|| / C (1 if
  all per-example gradients agreed, 0 if they were random), estimated without the 1 / sqrt(n) bias of the
  sample's own mean;
- the measured noise-to-signal of one step at (``--sigma``, ``--batch``): sigma sqrt(d) / (a B), against the
  plan's sigma sqrt(d) / B; and the head's own, over its coordinates alone (a new head holds nearly all of the
  signal in a few coordinates, so the noise on the others does not drown it: it damages the features instead).

At the round-0 adapter, so it describes the first steps; the gradients of a trained model differ.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

CLIPS = (10.0, 1.0, 0.1, 0.01)


def measure(recipe, shard, num_labels: int, examples: int, head: str) -> dict:
    import numpy as np
    import torch

    from fedlora_cli.adapters.methods import plan as method_plan
    from fedlora_cli.model.training import batch_loss
    from fedlora_cli.model.workbench import build

    bench = build(recipe, num_labels)
    params = bench.set_trainable(method_plan(recipe.federation.method, head, recipe.adapter.kind))
    names = [n for n, p in bench.model.named_parameters() if p.requires_grad]
    is_head = torch.tensor(np.concatenate([
        np.full(p.numel(), "lora_" not in n and "vera_" not in n) for n, p in bench.model.named_parameters()
        if p.requires_grad
    ]))
    rows = np.random.default_rng(0).choice(len(shard), size=min(examples, len(shard)), replace=False)
    bench.model.train()  # dropout on, as in training
    torch.manual_seed(0)
    grads = []
    for row in rows:
        loss = batch_loss(bench.model, bench.batch(shard, [row]), recipe.model.task)
        grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]))
    g = torch.stack(grads).double()
    norms = g.norm(dim=1)
    head_share = (g[:, is_head].norm(dim=1) ** 2 / norms**2).median() if bool(is_head.any()) else torch.tensor(0.0)
    clips = []
    for c in CLIPS:
        clipped = g * torch.clamp(c / norms, max=1.0)[:, None]
        # ||mean||^2 of n samples over-states ||E g||^2 by (E||g||^2 - ||E g||^2) / n: the unbiased estimate.
        n = len(clipped)
        mean_sq = float(clipped.mean(dim=0).norm() ** 2)
        signal_sq = max(0.0, (n * mean_sq - float((clipped.norm(dim=1) ** 2).mean())) / (n - 1))
        in_head = clipped[:, is_head]
        head_sq = max(0.0, (n * float(in_head.mean(dim=0).norm() ** 2) - float((in_head.norm(dim=1) ** 2).mean()))
                      / (n - 1))
        clips.append({"C": c, "clipped": float((norms > c).double().mean()), "alignment": signal_sq**0.5 / c,
                      "alignment_of_sample": mean_sq**0.5 / c, "head_alignment": head_sq**0.5 / c})
    return {
        "d": int(g.shape[1]), "d_head": int(is_head.sum()), "tensors": len(names), "examples": len(rows),
        "norm_quantiles": [float(q) for q in torch.quantile(norms, torch.tensor([0.1, 0.5, 0.9], dtype=norms.dtype))],
        "head_share": float(head_share), "clips": clips,
    }


def main() -> None:
    from fedlora_cli import recipe as recipes
    from fedlora_cli.data.examples import read_shard
    from fedlora_cli.data.partition import partition
    from fedlora_cli.recipe import catalog

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="quickstart")
    parser.add_argument("--methods", default="ffa,fedavg,fedsa")
    parser.add_argument("--heads", default="shared,frozen")
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--sigma", type=float, default=2.031, help="noise multiplier of the step to judge")
    parser.add_argument("--batch", type=int, default=1024, help="expected logical batch of the step to judge")
    parser.add_argument("--set", "-s", action="append", default=[], help="recipe override, key=value")
    parser.add_argument("--json")
    args = parser.parse_args()
    overrides = dict(recipes.parse_override(item) for item in args.set)
    base = recipes.load(catalog.find(args.recipe), overrides)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        part = partition(base.data, base.federation.clients, Path(tmp) / "partition")
        labels = part.manifest["label_names"]
        client = part.manifest["clients"][0]
        shard = read_shard(part.path / client["file"], base.data.text_column, base.data.label_column, len(labels),
                           labels)
        for method in args.methods.split(","):
            for head in args.heads.split(","):
                recipe = recipes.load(catalog.find(args.recipe), {**overrides, "federation.method": method,
                                                                    "federation.head": head})
                started = time.perf_counter()
                r = measure(recipe, shard, len(labels), args.examples, head)
                results.append({"method": method, "head": head, "seconds": time.perf_counter() - started, **r})
                print(f"{method} head={head}: d {r['d']}, done in {results[-1]['seconds']:.0f} s", flush=True)
    print(f"\n# DP signal at the round-0 adapter, {time.strftime('%Y-%m-%d')}, {platform.machine()}; "
          f"recipe {args.recipe} {overrides}, {args.examples} examples of client-0, step judged at sigma "
          f"{args.sigma:g}, B {args.batch}")
    print("| method | head | d | per-example norm 10/50/90% | head share of norm^2 | alignment a at C = "
          + " / ".join(f"{c:g}" for c in CLIPS) + " | noise/signal planned | measured (smallest C) | the head's own |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        planned = args.sigma * r["d"] ** 0.5 / args.batch
        a, a_head = r["clips"][-1]["alignment"], r["clips"][-1]["head_alignment"]
        # The head's coordinates alone: their own noise (sigma C sqrt(d_head) / B) against their share of the signal.
        head_ratio = f"{args.sigma * r['d_head'] ** 0.5 / args.batch / a_head:.2f}" if a_head > 0 else "-"
        alignments = " / ".join(f"{c['alignment']:.3f}" for c in r["clips"])
        print(f"| {r['method']} | {r['head']} | {r['d']:,} | {' / '.join(f'{q:.3g}' for q in r['norm_quantiles'])} | "
              f"{r['head_share']:.3f} | {alignments} | "
              f"{planned:.2f} | {planned / a:.2f} | {head_ratio} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "recipe": args.recipe,
                                               "overrides": overrides, "sigma": args.sigma, "batch": args.batch,
                                               "results": results}, indent=2))


if __name__ == "__main__":
    main()
