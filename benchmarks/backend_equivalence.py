"""The coordinator's numpy backend against the torch backend it replaced, on the same update folders.

    python benchmarks/backend_equivalence.py OLD_TREE [--dir /tmp/fedlora-equivalence] [--new-tree .]

OLD_TREE is a checkout of fedlora from before the numpy backend (``git worktree add /tmp/fedlora-before
<commit>``). Small LLaMA-shaped federations (2 layers, q/k/v/o projections 48 x 48, r = 4, 6 clients whose
updates move the global by different amounts) are written once, in float32, bfloat16 and float64, each without a
server optimiser and with each of fedavgm, fedadam, fedyogi and fedadagrad (their global at round 1 carries
non-zero moments, so the state is continued, not started), and one whose clients 0 and 1 train ranks 2 and 3
(svd's HetLoRA setting: each received the global truncated and rescaled). Both trees then aggregate every case in
one fresh process per tree (``fedlora_cli.federation.aggregate_round``, the CLI's core): every strategy x (no bound,
norm bound clip, norm bound reject), DP-FedAvg (noise multiplier 0, so the noise cannot differ) x the same bounds,
every server optimiser around mean, median, trimmed-mean and DP-FedAvg, and svd over the mixed ranks x the bounds. The written tensors (adapter,
correction, server state) are compared: max |new - old| and max |new - old| / max |old| per case, and for the
adapter tensors the largest difference in units in the last place (of the tensor's largest value, in the written
dtype), and the per-layer reports svd and exact write in the manifest; a case both refuse must be refused with the
same message. svd's factors are compared with each component's
sign fixed alike (the torch backend kept the signs its LAPACK chose; the numpy one fixes them, :func:`signed`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

LAYERS, HIDDEN, RANK, CLIENTS = 2, 48, 4, 6
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
DTYPES = ("float32", "bfloat16", "float64")
OPTIMIZERS = ("none", "fedavgm", "fedadam", "fedyogi", "fedadagrad")
# Federations: without and with each server optimiser, and one whose clients train different ranks (svd's HetLoRA).
VARIANTS = (*OPTIMIZERS, "client-ranks")
CLIENT_RANKS = {"client-0": 2, "client-1": 3}
STRATEGIES = ("mean", "median", "trimmed-mean", "svd", "exact")
BOUNDS = ("none", "clip", "reject")
FILES = ("adapter_model.safetensors", "correction.safetensors", "server_state.safetensors")


def cases() -> list[dict]:
    """Every aggregation to compare: the federation it reads and the options it passes."""
    found = []
    for dtype in DTYPES:
        for optimizer in VARIANTS:
            strategies = {"none": (*STRATEGIES, "dp-fedavg"), "client-ranks": ("svd",)}.get(
                optimizer, ("mean", "median", "trimmed-mean", "dp-fedavg"))
            bounds = BOUNDS if optimizer in ("none", "client-ranks") else ("none",)
            for strategy in strategies:
                for bound in bounds:
                    found.append({"dtype": dtype, "optimizer": optimizer, "strategy": strategy, "bound": bound,
                                  "name": f"{dtype}-{optimizer}-{strategy}-{bound}"})
    return found


def tensor_names() -> list[tuple[str, tuple[int, int]]]:
    names = []
    for layer in range(LAYERS):
        for proj in PROJECTIONS:
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            names += [(f"{prefix}.lora_A.weight", (RANK, HIDDEN)), (f"{prefix}.lora_B.weight", (HIDDEN, RANK))]
    return names


def make_federation(root: Path, dtype_name: str, optimizer: str) -> dict:
    """A global checkpoint at round 1 and CLIENTS updates of round 2; returns the folders and a norm bound that
    only the largest update exceeds."""
    import torch

    from fedlora_cli import federation, recipe as recipes, storage
    from fedlora_cli.adapters.methods import plan
    from fedlora_cli.aggregation.server_optimizers import MOMENTUM, SERVER_OPTIMIZERS, VARIANCE, state_name

    dtype = getattr(torch, dtype_name)
    fed = {"method": "fedavg", "head": "frozen", "clients": CLIENTS}
    adapter = {"r": RANK, "alpha": 8, "target_modules": list(PROJECTIONS)}
    if optimizer == "client-ranks":
        adapter["client_ranks"], fed["aggregation"] = CLIENT_RANKS, "svd"
    elif optimizer != "none":
        fed.update(server_optimizer=optimizer, server_lr=0.05)
    recipe = recipes.from_dict({"name": "equivalence", "model": {"base": "synthetic/llama-shaped", "num_labels": 2},
                                "adapter": adapter, "federation": fed})
    generator = torch.Generator().manual_seed(0)
    tensors = {name: (torch.randn(shape, generator=generator, dtype=torch.float64) * 0.1).to(dtype)
               for name, shape in tensor_names()}
    state = {}
    if optimizer in SERVER_OPTIMIZERS:
        moments = torch.float64 if dtype == torch.float64 else torch.float32
        for name, t in tensors.items():
            state[state_name(MOMENTUM, name)] = torch.randn(t.shape, generator=generator, dtype=moments) * 1e-3
            state[state_name(VARIANCE, name)] = torch.rand(t.shape, generator=generator, dtype=moments) * 1e-5
    digests, state_digests = federation.digests(tensors), federation.digests(state)
    manifest = storage.GlobalManifest(
        round=1, method="fedavg", head="frozen", adapter_kind="lora", base_model=recipe.model.base,
        base_fingerprint="equivalence", recipe=recipe.to_dict(), recipe_digest=recipe.digest(), seed=0, num_labels=2,
        tensor_digests=digests, server_state_digests=state_digests,
        digest=storage.global_digest(digests, {}, state_digests),
        frozen_digest=federation.frozen_digest(plan("fedavg", "frozen"), digests),
    )
    global_dir = root / "global-001"
    storage.write_global(global_dir, manifest, tensors, {"peft_type": "LORA"}, overwrite=True, server_state=state)
    return {"global": str(global_dir), **write_updates(root, manifest, tensors, generator, recipe.adapter.rank_for)}


def received(tensors: dict, rank: int) -> dict:
    """The global as a client of ``rank`` receives it: truncated, B rescaled to its LoRA scale (alpha / r)."""
    if rank == RANK:
        return tensors
    out = {}
    for name, t in tensors.items():
        out[name] = t[:rank] if "lora_A" in name else (t[:, :rank].double() * (rank / RANK)).to(t.dtype)
    return out


def write_updates(root: Path, manifest, tensors: dict, generator, rank_for) -> dict:
    """CLIENTS updates of round 2, moved from what each received by different amounts; the folders and a norm bound
    that only the largest update exceeds."""
    import torch

    from fedlora_cli import federation, storage

    updates, norms = [], []
    for k in range(CLIENTS):
        step = 0.002 * (k + 1) ** 1.5  # clients move the global by different amounts: the bound tells them apart
        start = received(tensors, rank_for(f"client-{k}"))
        update = {name: (t.double() + torch.randn(t.shape, generator=generator, dtype=torch.float64) * step).to(t.dtype)
                  for name, t in start.items()}
        norms.append(sum(float((update[n].double() - t.double()).square().sum()) for n, t in start.items()) ** 0.5)
        m = storage.UpdateManifest(
            client_id=f"client-{k}", round=2, parent_digest=manifest.digest, method="fedavg",
            recipe_digest=manifest.recipe_digest, base_fingerprint="equivalence", frozen_digest=manifest.frozen_digest,
            num_examples=37 + 11 * k, shard_examples=40 + 11 * k, steps=10, loss=0.5, seconds=1.0, bytes=0,
            tensor_digests=federation.digests(update),
        )
        path = root / "updates" / f"client-{k}"
        storage.write_update(path, m, update, overwrite=True)
        updates.append(str(path))
    return {"updates": updates, "bound": sorted(norms)[-2]}


def run_case(case: dict, federations: dict, out: Path) -> dict:
    """One aggregation in this process (the tree on PYTHONPATH): 'ok', or the refusal's message."""
    from fedlora_cli import federation, recipe as recipes
    from fedlora_cli.errors import FedloraError

    fed = federations[f"{case['dtype']}-{case['optimizer']}"]
    options: dict = {}
    if case["strategy"] == "dp-fedavg":
        clip = fed["bound"] * 0.8  # clips the larger updates, not all
        options["server_privacy"] = recipes.ServerPrivacySection(clip_norm=clip, noise_multiplier=0.0, delta=1e-5)
    else:
        options["strategy"] = case["strategy"]
    if case["bound"] != "none":
        options.update(norm_bound=fed["bound"], norm_bound_action=case["bound"])
    try:
        federation.aggregate_round(Path(fed["global"]), [Path(u) for u in fed["updates"]], out, noise_seed=0,
                                   server_ledger=out.parent / f"{case['name']}.ledger.json", **options)
    except FedloraError as exc:
        return {"refused": str(exc).replace(str(out.parent), "OUT")}
    return {"ok": True}


def worker(tree: str, root: Path, outputs: Path) -> None:
    import fedlora_cli

    assert Path(fedlora_cli.__file__).resolve().is_relative_to(Path(tree).resolve()), fedlora_cli.__file__
    federations = json.loads((root / "federations.json").read_text())
    results = {case["name"]: run_case(case, federations, outputs / case["name"]) for case in cases()}
    (outputs / "results.json").write_text(json.dumps(results, indent=1))


def compare(old: Path, new: Path) -> list[dict]:
    """Per case: the max absolute and relative differences over every written tensor, or both refusals."""
    import numpy as np
    import torch
    from safetensors.torch import load_file

    results = [json.loads((d / "results.json").read_text()) for d in (old, new)]
    rows = []
    for case in cases():
        a, b = results[0][case["name"]], results[1][case["name"]]
        row = {**case, "old": "ok" if "ok" in a else a["refused"], "new": "ok" if "ok" in b else b["refused"],
               "abs": 0.0, "rel": 0.0, "tensors": 0, "ulps": 0.0, "report": 0.0}
        if "ok" in a and "ok" in b:
            for filename in FILES:
                paths = [d / case["name"] / filename for d in (old, new)]
                if paths[0].exists() != paths[1].exists():
                    row["new"] = f"{filename} written by one tree only"
                    continue
                if not paths[0].exists():
                    continue
                x, y = (load_file(str(p)) for p in paths)
                if case["strategy"] == "svd" and filename == FILES[0]:
                    x, y = signed(x), signed(y)
                if set(x) != set(y) or any(x[n].dtype != y[n].dtype or x[n].shape != y[n].shape for n in x):
                    row["new"] = f"{filename}: other names, dtypes or shapes"
                    continue
                for n in x:
                    diff = float((x[n].double() - y[n].double()).abs().max())
                    scale = float(x[n].double().abs().max())
                    row["abs"] = max(row["abs"], diff)
                    row["rel"] = max(row["rel"], diff / scale if scale > 0 else (0.0 if diff == 0 else np.inf))
                    row["tensors"] += 1
                    if filename == FILES[0]:
                        row["ulps"] = max(row["ulps"], ulps(x[n], y[n]))
            row["report"] = report_difference(*(d / case["name"] / "fedlora.json" for d in (old, new)))
        rows.append(row)
    return rows


def report_difference(old: Path, new: Path) -> float:
    """The largest relative difference between the two manifests' per-layer reports (svd, exact: the error of
    plain averaging, svd's truncation error; its numerical rank must be equal), 0 without one."""
    layers = [json.loads(p.read_text())["aggregation"].get("layers", {}) for p in (old, new)]
    worst = 0.0
    for layer, report in layers[0].items():
        other = layers[1][layer]
        if report.get("rank") != other.get("rank"):
            return float("inf")
        for key in ("mean_error", "truncation_error"):
            if report.get(key) is not None:
                worst = max(worst, abs(other[key] - report[key]) / max(abs(report[key]), 1e-300))
    return worst


def signed(tensors: dict) -> dict:
    """svd's factors with each component's sign fixed as the numpy backend fixes it (the largest entry of each row
    of A positive, the matching column of B with it): the torch backend kept whatever signs its LAPACK chose."""
    import torch

    out = dict(tensors)
    for name, a in tensors.items():
        if name.endswith("lora_A.weight"):
            b_name = name.replace("lora_A", "lora_B")
            picked = a.gather(1, a.abs().argmax(dim=1, keepdim=True)).squeeze(1)
            flip = torch.where(picked < 0, -1.0, 1.0).to(a.dtype)
            out[name], out[b_name] = a * flip[:, None], tensors[b_name] * flip[None, :]
    return out


def ulps(old, new) -> float:
    """The largest |new - old| in units in the last place of the tensor's largest value, in its own dtype (an
    element near zero, where cancellation leaves few significant bits, is not measured in its own units)."""
    import math

    import torch

    largest = float(old.double().abs().max())
    if largest == 0:
        return 0.0 if bool((new == 0).all()) else math.inf
    unit = 2.0 ** math.floor(math.log2(largest)) * torch.finfo(old.dtype).eps
    return float((new.double() - old.double()).abs().max()) / unit


def table(rows: list[dict]) -> str:
    lines = ["| dtype | federation | strategy | norm bound | tensors | max abs diff | max rel diff | adapter ulps "
             "| layer report rel diff | outcome |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        same = r["old"] == r["new"]
        outcome = "both wrote" if same and r["old"] == "ok" else (f"both refuse: {r['old']}" if same else
                                                                   f"DIFFER: old {r['old']!r}, new {r['new']!r}")
        lines.append(f"| {r['dtype']} | {r['optimizer']} | {r['strategy']} | {r['bound']} | {r['tensors']} | "
                     f"{r['abs']:.3g} | {r['rel']:.3g} | {r['ulps']:.3g} | {r['report']:.3g} | {outcome} |")
    return "\n".join(lines)


def run_tree(tree: str, root: Path, outputs: Path) -> None:
    shutil.rmtree(outputs, ignore_errors=True)
    outputs.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(Path(tree).resolve())}
    proc = subprocess.run([sys.executable, __file__, tree, "--dir", str(root), "--worker", str(outputs)], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{tree} failed:\n{proc.stderr}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old_tree")
    parser.add_argument("--new-tree", default=str(Path(__file__).resolve().parents[1]))
    parser.add_argument("--dir", default="/tmp/fedlora-equivalence")
    parser.add_argument("--json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    root = Path(args.dir)
    if args.worker:
        worker(args.old_tree, root, Path(args.worker))
        return
    shutil.rmtree(root, ignore_errors=True)
    federations = {f"{d}-{o}": make_federation(root / f"{d}-{o}", d, o) for d in DTYPES for o in VARIANTS}
    (root / "federations.json").write_text(json.dumps(federations))
    run_tree(args.old_tree, root, root / "old")
    run_tree(args.new_tree, root, root / "new")
    rows = compare(root / "old", root / "new")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
