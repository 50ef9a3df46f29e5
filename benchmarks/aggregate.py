"""Coordinator cost: `fedlora aggregate` against the memory-bandwidth limit and the common load-everything baseline.

    python benchmarks/aggregate.py [--clients 8,32,64] [--repeats 3] [--dir /tmp/fedlora-bench-agg] [--json f]
                                   [--strategy mean|median|svd] [--server-privacy] [--layers 32] [--kinds ...]

Client updates are LLaMA-7B shaped LoRA adapters (32 layers, q/k/v/o projections 4096x4096, r = 16,
float32: 67 MB each), written to disk exactly as `train-client` writes them. Four ways to average them, each
in a fresh process, measured side by side over the same files:

    fedlora    `fedlora aggregate GLOBAL UPDATES... --out NEXT --json` end to end (the CLI's own entry point, run
               in the worker process): validation, digests, streaming mean, the per-client table, writing.
               The default strategy, so fedlora's numpy round (fedlora_cli/federation/numpy_round.py): it
               never imports torch, reads each update's tensors one at a time (pread: a mapping SIGBUSes when another
               process truncates the file, issue 28) and visits each once (norm, add, digest)
    limit      read each file's bytes into memory and add them into one float32 sum with numpy, one pass
    floor      the same sum over memory-mapped files (no copy out of the page cache): what this machine can
               do at best, and the fair bar for a loader that maps files, as safetensors does
    baseline   load every update into a dict (safetensors), then average key by key (what most projects do)

``--strategy`` (median, svd) and ``--server-privacy`` (DP-FedAvg: ``--dp-clip 0.01 --dp-noise 1.0``) measure
`fedlora aggregate` with that strategy instead of the mean; the other three ways average, so they are measured for
the plain mean only (``--kinds`` chooses). ``--kinds safe_open,mapped`` compares the two safetensors readers alone
(every tensor read and digested). ``--layers`` keeps fewer LLaMA-7B layers (each still 4 projections of
4096 x 4096 at r = 16), for svd, whose dense 4096 x 4096 SVD per projection costs seconds each. Run it with an older
fedlora first on PYTHONPATH (``PYTHONPATH=/tmp/fedlora-before``) for a before / after comparison.

Each worker's time runs from before its first import (fedlora's or numpy's; torch only for the baseline) to
the end, so start-up is included for all alike. Throughput is update bytes per second; peak memory is the
process's maximum RSS. Files are read from the page cache after the first pass (they were just written), so
this measures compute and memory traffic, not disk.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

LAYERS, HIDDEN, RANK = 32, 4096, 16
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
KINDS = ("fedlora", "limit", "floor", "baseline")


def tensor_names(layers: int = LAYERS) -> list[tuple[str, tuple[int, int]]]:
    names = []
    for layer in range(layers):
        for proj in PROJECTIONS:
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            names.append((f"{prefix}.lora_A.weight", (RANK, HIDDEN)))
            names.append((f"{prefix}.lora_B.weight", (HIDDEN, RANK)))
    return names


def make_federation(root: Path, clients: int, layers: int = LAYERS) -> tuple[Path, list[Path]]:
    """A round-0 global checkpoint and ``clients`` round-1 updates, through fedlora's own writers."""
    import torch

    from fedlora_cli import federation, recipe as recipes, storage
    from fedlora_cli.adapters.methods import plan

    recipe = recipes.from_dict({
        "name": "bench", "model": {"base": "synthetic/llama-7b-shaped", "num_labels": 2},
        "adapter": {"r": RANK, "alpha": 32, "target_modules": list(PROJECTIONS)},
        "federation": {"method": "fedavg", "head": "frozen", "clients": clients},
    })
    generator = torch.Generator().manual_seed(0)
    tensors = {name: torch.randn(shape, generator=generator) * 0.01 for name, shape in tensor_names(layers)}
    digests = federation.digests(tensors)
    manifest = storage.GlobalManifest(
        round=0, method="fedavg", head="frozen", adapter_kind="lora", base_model=recipe.model.base,
        base_fingerprint="bench", recipe=recipe.to_dict(), recipe_digest=recipe.digest(), seed=0, num_labels=2,
        tensor_digests=digests, digest=storage.combined_digest(digests),
        frozen_digest=federation.frozen_digest(plan("fedavg", "frozen"), digests),
    )
    global_dir = root / "global-000"
    storage.write_global(global_dir, manifest, tensors, {"peft_type": "LORA"}, overwrite=True)
    updates = []
    for k in range(clients):
        update = {name: t + torch.randn(t.shape, generator=generator) * 0.001 for name, t in tensors.items()}
        m = storage.UpdateManifest(
            client_id=f"client-{k}", round=1, parent_digest=manifest.digest, method="fedavg",
            recipe_digest=manifest.recipe_digest, base_fingerprint="bench", frozen_digest=manifest.frozen_digest,
            num_examples=100 + k, shard_examples=100 + k, steps=10, loss=0.5, seconds=1.0, bytes=0,
            tensor_digests=federation.digests(update),
        )
        path = root / "updates" / f"client-{k}"
        storage.write_update(path, m, update, overwrite=True)
        updates.append(path)
    return global_dir, updates


def run_sum(files: list[str], mapped: bool) -> None:
    """limit (mapped=False: each file read into memory) or floor (mapped=True: the page cache mapped in place)."""
    import numpy as np

    total = None
    for f in files:
        if mapped:
            data = np.memmap(f, dtype=np.uint8, mode="r")
        else:
            with open(f, "rb") as handle:
                data = np.frombuffer(handle.read(), dtype=np.uint8)
        header = int.from_bytes(data[:8].tobytes(), "little")
        values = data[8 + header:].view(np.float32)
        if total is None:
            total = values.copy()
        else:
            total += values
        if mapped:
            del data, values  # unmap now: a mapping's pages count in the RSS until it is dropped
    assert total is not None


def run_baseline(files: list[str]) -> None:
    from safetensors.torch import load_file

    updates = [load_file(f) for f in files]
    n = len(updates)
    _ = {name: sum(u[name] for u in updates) / n for name in updates[0]}


def run_reader(files: list[str], kind: str) -> None:
    """Every tensor of every update read and digested (what the coordinator does to each before it may use it), by
    the safetensors library's numpy reader ('safe_open', which copies each tensor out) or fedlora's ('mapped')."""
    from safetensors import safe_open

    from fedlora_cli import storage
    from fedlora_cli.storage.mapped import read_tensors

    for f in files:
        if kind == "mapped":
            for t in read_tensors(Path(f), "client update tensors").values():
                storage.tensor_digest(t)
        else:
            with safe_open(f, framework="numpy") as handle:
                for name in handle.keys():
                    storage.tensor_digest(handle.get_tensor(name))


def worker(kind: str, global_dir: str, update_dirs: list[str], out: str, options: list[str]) -> None:
    from fedlora_cli import storage

    files = [str(Path(d) / storage.UPDATE_TENSORS) for d in update_dirs]
    if kind in ("safe_open", "mapped"):
        run_reader(files, kind)
    elif kind in ("limit", "floor"):
        run_sum(files, mapped=kind == "floor")
    elif kind == "baseline":
        run_baseline(files)
    else:
        import contextlib
        import io

        from fedlora_cli import cli

        sys.argv = ["fedlora", "aggregate", global_dir, *update_dirs, "--out", out, "--overwrite", "--json", *options]
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                cli.main()
            except SystemExit as exc:
                if exc.code:
                    raise


def peak_rss_mb() -> float:
    """This process's high-water resident set (VmHWM): unlike ru_maxrss it does not inherit the parent's."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def aggregate_options(args: argparse.Namespace) -> list[str]:
    """What `fedlora aggregate` is asked for besides the mean."""
    options = ["--strategy", args.strategy] if args.strategy != "mean" else []
    return options + (["--dp-clip", "0.01", "--dp-noise", "1.0"] if args.server_privacy else [])


def measure(args: argparse.Namespace, root: Path, n: int, kinds: list[str]) -> dict:
    """Every kind on a fresh federation of ``n`` updates, ``args.repeats`` times each: the medians."""
    shutil.rmtree(root, ignore_errors=True)
    global_dir, updates = make_federation(root, n, args.layers)
    update_bytes = sum((u / "update.safetensors").stat().st_size for u in updates)
    results: dict[str, list[dict]] = {kind: [] for kind in kinds}
    for _ in range(args.repeats):
        for kind in results:
            payload = json.dumps([kind, str(global_dir), [str(u) for u in updates], str(root / "global-001"),
                                  aggregate_options(args)])
            proc = subprocess.run([sys.executable, __file__, "--worker", payload], capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{kind} failed: {proc.stderr.strip().splitlines()[-1]}")
            results[kind].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    row = {"clients": n, "update_mb": update_bytes / n / 1e6}
    for kind, runs in results.items():
        seconds = statistics.median(r["seconds"] for r in runs)
        row[kind] = {"seconds": seconds, "mb_per_s": update_bytes / seconds / 1e6,
                     "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs)}
    print(f"N={n} done", file=sys.stderr, flush=True)
    return row


def print_table(rows: list[dict], kinds: list[str], args: argparse.Namespace) -> None:
    import fedlora_cli

    what = " ".join(["fedlora aggregate", *aggregate_options(args)])
    print(f"# `{what}` of LLaMA-7B-shaped LoRA updates ({args.layers} layers, r={RANK}, {rows[0]['update_mb']:.0f} MB "
          f"each), median of {args.repeats}, {time.strftime('%Y-%m-%d')}, {platform.machine()}, python "
          f"{platform.python_version()}, fedlora from {Path(fedlora_cli.__file__).parent}")
    print("| N | " + " | ".join(f"{k} s" for k in kinds) + " | " + " | ".join(f"{k} RSS MB" for k in kinds) + " |")
    print("|---|" + "---|" * (2 * len(kinds)))
    for r in rows:
        print(f"| {r['clients']} | " + " | ".join(f"{r[k]['seconds']:.2f}" for k in kinds) + " | "
              + " | ".join(f"{r[k]['peak_rss_mb']:.0f}" for k in kinds) + " |")


def print_marginal(rows: list[dict]) -> None:
    """The cost of one more client, free of start-up (imports, and for fedlora reading the global checkpoint and
    writing the next): the slope between consecutive N, as throughput ratios of fedlora to the limit and floor."""
    for lo, hi in zip(rows, rows[1:]):
        dn = hi["clients"] - lo["clients"]
        slope = {k: (hi[k]["seconds"] - lo[k]["seconds"]) / dn for k in KINDS}
        hi["marginal_seconds_per_update"] = slope

        def ratio(k: str) -> float:
            return slope[k] / slope["fedlora"] if slope["fedlora"] > 0 else float("nan")

        print(f"marginal N={lo['clients']}->{hi['clients']}: fedlora {slope['fedlora'] * 1000:.0f} ms/update, "
              f"limit {slope['limit'] * 1000:.0f}, floor {slope['floor'] * 1000:.0f}, baseline "
              f"{slope['baseline'] * 1000:.0f} ms/update; fedlora throughput / limit {ratio('limit'):.2f}, "
              f"/ floor {ratio('floor'):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="8,32,64")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default="/tmp/fedlora-bench-agg")
    parser.add_argument("--json")
    parser.add_argument("--strategy", choices=("mean", "median", "svd"), default="mean")
    parser.add_argument("--server-privacy", action="store_true", help="DP-FedAvg around the strategy")
    parser.add_argument("--layers", type=int, default=LAYERS)
    parser.add_argument("--kinds", help=f"any of {','.join(KINDS)}; default all for the mean, else fedlora; or the "
                        "readers alone, safe_open and mapped (each tensor read and digested)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, global_dir, update_dirs, out, options = json.loads(args.worker)
        start = time.perf_counter()
        worker(kind, global_dir, update_dirs, out, options)
        seconds = time.perf_counter() - start
        print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_rss_mb()}))
        return
    plain = args.strategy == "mean" and not args.server_privacy
    kinds = args.kinds.split(",") if args.kinds else list(KINDS if plain else ("fedlora",))
    root = Path(args.dir)
    rows = [measure(args, root, int(n), kinds) for n in args.clients.split(",")]
    shutil.rmtree(root, ignore_errors=True)
    print_table(rows, kinds, args)
    if kinds == list(KINDS):
        print_marginal(rows)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "date": time.strftime("%Y-%m-%d"), "machine": platform.node(), "repeats": args.repeats,
            "options": aggregate_options(args), "layers": args.layers, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
