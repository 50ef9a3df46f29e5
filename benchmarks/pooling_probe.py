"""What the classifier head can read: a linear head on the frozen base's features, per ``model.pooling``.

    python benchmarks/pooling_probe.py [--recipe ffa-lora-dp] [--poolings default,mean] [--epsilons none,3,1]
                                       [--seeds 0,1,2] [--json f]

At round 0 an FFA-LoRA (or FedAvg-LoRA) model is its frozen base plus a new head: B is zero, so the head reads
the base's own features, and whatever the head can learn from them bounds how fast the first rounds can learn.
This script builds the recipe's client model through fedlora's workbench for each pooling, records what its
classifier reads for every example of the recipe's partition (the clients' shards and the test split), and then
fits a linear head on those features:

- to convergence without noise (full-batch L-BFGS, a small L2 penalty): the head's ceiling per pooling;
- federated under DP-SGD, as the recipe's clients would train the head alone: each round every client runs the
  recipe's local steps of Poisson-sampled logical batches (the recipe's batch size) with per-example clipping at
  ``privacy.max_grad_norm`` and Gaussian noise, from the global head; the server averages the clients' heads.
  The noise multiplier is calibrated with fedlora's accountant for the recipe's rounds and the smallest client,
  as ``fedlora init`` does. Plain SGD at ``--lr`` rates; the best mean over seeds is reported per cell. The
  rate is chosen on the test split itself, so these cells are optimistic by the choice of one of four rates.

It trains only the head (d = hidden + 1 per class), so it says what the features allow, not what a federation
that also trains B reaches; benchmarks/dp_quality.py runs those.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path


def features(recipe, shards, num_labels: int):
    """What the classifier reads for each example of each shard (the input of its forward), and the labels."""
    import torch

    from fedlora_cli.model.workbench import build

    bench = build(recipe, num_labels)
    seen: list = []
    classifier = bench.model.get_base_model().classifier
    hook = classifier.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().float()))
    out = []
    with torch.no_grad():
        for shard in shards:
            seen.clear()
            labels = []
            for start in range(0, len(shard), 256):
                batch = bench.batch(shard, list(range(start, min(start + 256, len(shard)))))
                labels.append(batch.pop("labels"))
                bench.model(**batch)
            out.append((torch.cat(seen).double(), torch.cat(labels)))
    hook.remove()
    return out


def converged_accuracy(train, test, l2: float = 1e-4) -> float:
    import torch

    x = torch.cat([f for f, _ in train])
    y = torch.cat([lab for _, lab in train])
    w = torch.zeros(x.shape[1] + 1, int(y.max()) + 1, dtype=x.dtype, requires_grad=True)
    ones = torch.ones(len(x), 1, dtype=x.dtype)
    opt = torch.optim.LBFGS([w], max_iter=500)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(torch.cat([x, ones], 1) @ w, y) + l2 * (w[:-1] ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return accuracy(w.detach(), test)


def accuracy(w, data) -> float:
    import torch

    x, y = data
    return float(((torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1) @ w).argmax(1) == y).double().mean())


def dp_head(clients, test, sigma: float, batch: int, steps: int, rounds: int, lr: float, clip: float,
            seed: int) -> float:
    """Federated DP-SGD of a linear head alone (per-example gradients in closed form)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    classes = int(test[1].max()) + 1
    w = torch.zeros(test[0].shape[1] + 1, classes, dtype=test[0].dtype)
    for _ in range(rounds):
        heads = []
        for x, y in clients:
            x1 = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
            local = w.clone()
            q = min(1.0, batch / len(x))
            for _ in range(steps):
                rows = torch.rand(len(x), generator=gen) < q
                xb, yb = x1[rows], y[rows]
                residual = torch.softmax(xb @ local, 1)
                residual[torch.arange(len(yb)), yb] -= 1
                per_example = xb[:, :, None] * residual[:, None, :]
                norms = per_example.flatten(1).norm(dim=1).clamp(min=1e-12)
                clipped = per_example * (clip / norms).clamp(max=1.0)[:, None, None]
                noise = sigma * clip * torch.randn(local.shape, generator=gen, dtype=local.dtype)
                local -= lr * (clipped.sum(0) + noise) / batch
            heads.append(local)
        w = sum(heads) / len(heads)
    return accuracy(w, test)


def main() -> None:
    from fedlora_cli import recipe as recipes
    from fedlora_cli.data.examples import read_shard
    from fedlora_cli.data.partition import partition
    from fedlora_cli.privacy.accounting import calibrate
    from fedlora_cli.recipe import catalog

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="ffa-lora-dp")
    parser.add_argument("--poolings", default="default,mean")
    parser.add_argument("--epsilons", default="none,3,1")
    parser.add_argument("--lr", default="2,4,8,16", help="SGD rates tried for the DP head")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--set", "-s", action="append", default=[], help="recipe override, key=value")
    parser.add_argument("--json")
    args = parser.parse_args()
    overrides = dict(recipes.parse_override(item) for item in args.set)
    base = recipes.load(catalog.find(args.recipe), overrides)
    t, f = base.training, base.federation
    clip = base.privacy.max_grad_norm if base.privacy is not None else 1.0
    delta = base.privacy.delta if base.privacy is not None else 1e-5
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        part = partition(base.data, f.clients, Path(tmp) / "partition")
        labels = part.manifest["label_names"]
        files = [c["file"] for c in part.manifest["clients"]] + [part.manifest["test"]["file"]]
        shards = [read_shard(part.path / name, base.data.text_column, base.data.label_column, len(labels), labels)
                  for name in files]
        smallest = min(len(s) for s in shards[:-1])
        for pooling in args.poolings.split(","):
            started = time.perf_counter()
            recipe = recipes.load(catalog.find(args.recipe), {**overrides, "model.pooling": pooling})
            *clients, test = features(recipe, shards, len(labels))
            row = {"pooling": pooling, "converged": converged_accuracy(clients, test), "dp": {}}
            for eps in args.epsilons.split(","):
                sigma = 0.0 if eps == "none" else calibrate(float(eps), delta, min(1.0, t.batch_size / smallest),
                                                            t.local_steps * f.rounds)
                best = None
                for lr in (float(v) for v in args.lr.split(",")):
                    accs = [dp_head(clients, test, sigma, t.batch_size, t.local_steps, f.rounds, lr, clip, int(s))
                            for s in args.seeds.split(",")]
                    cell = {"lr": lr, "sigma": sigma, "mean": sum(accs) / len(accs), "min": min(accs),
                            "max": max(accs)}
                    best = cell if best is None or cell["mean"] > best["mean"] else best
                row["dp"][eps] = best
            row["seconds"] = time.perf_counter() - started
            rows.append(row)
            print(f"{pooling}: done in {row['seconds']:.0f} s", flush=True)
    print(f"\n# Linear head on frozen features, {time.strftime('%Y-%m-%d')}, {platform.machine()}; recipe "
          f"{args.recipe} {overrides}: {f.clients} clients, {f.rounds} rounds of {t.local_steps} steps of "
          f"{t.batch_size}, C = {clip:g}, seeds {args.seeds}")
    epsilons = args.epsilons.split(",")
    print("| pooling | converged, no noise | " + " | ".join(f"federated SGD, eps {e}" for e in epsilons) + " |")
    print("|---|---|" + "---|" * len(epsilons))
    for r in rows:
        cells = [f"{c['mean']:.3f} ({c['min']:.3f}-{c['max']:.3f}; lr {c['lr']:g}, sigma {c['sigma']:.2f})"
                 for c in (r["dp"][e] for e in epsilons)]
        print(f"| {r['pooling']} | {r['converged']:.3f} | " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "recipe": args.recipe,
                                               "overrides": overrides, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
