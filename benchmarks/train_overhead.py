"""What `fedlora train-client` costs over the plain PEFT + torch loop a user would otherwise write.

    python benchmarks/train_overhead.py [--repeats 3] [--client client-1] [--dir /tmp/fedlora-bench-train] [--json f]

Set-up (not timed): the quickstart partition and round-0 global checkpoint, made with the fedlora CLI. Then,
alternating, each in a fresh process:

    fedlora    `fedlora train-client GLOBAL --data SHARD --state S --out U` as a user runs it: start-up,
               recipe and checkpoint validation, model loading, the round's local steps, digests, writing the
               client update and the client state
    plain      a minimal hand-written script doing the same work: load the tokenizer and model, attach the
               same LoRA config, load the global adapter tensors, freeze A, AdamW at the recipe's rate, the
               same number of steps over seeded shuffled batches of the same size, save the B tensors and head

Per-step time is the training loop's time divided by its steps (fedlora's from the update manifest, which times
its loop the same way; plain's measured around its loop). Whole-process time is wall time from the parent.
Both run on the thread count of the environment (set OMP_NUM_THREADS for a reproducible figure).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def plain_worker(global_dir: str, shard: str, out: str, client_id: str) -> dict:
    """The loop a user would write by hand (kept deliberately free of fedlora imports)."""
    import numpy as np
    import pandas as pd
    import torch
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    recipe = json.loads((Path(global_dir) / "fedlora.json").read_text())["recipe"]
    base = recipe["model"]["base"]
    if base.startswith("pkg:"):
        import importlib.util

        package, _, rest = base[4:].partition("/")
        base = str(Path(importlib.util.find_spec(package).submodule_search_locations[0]) / rest)
    a, t = recipe["adapter"], recipe["training"]
    torch.manual_seed(t["seed"])
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=len(recipe["data"]["labels"]))
    model = get_peft_model(model, LoraConfig(
        r=a["r"], lora_alpha=a["alpha"], lora_dropout=a["dropout"], target_modules=a["target_modules"], task_type="SEQ_CLS",
    ))
    set_peft_model_state_dict(model, load_file(str(Path(global_dir) / "adapter_model.safetensors")))
    params = []
    for name, p in model.named_parameters():
        p.requires_grad = "lora_B" in name or "modules_to_save" in name
        if p.requires_grad:
            params.append(p)
    frame = pd.read_parquet(shard)
    texts, labels = frame[recipe["data"]["text_column"]].astype(str).tolist(), frame[recipe["data"]["label_column"]].to_numpy()

    loop_started = time.perf_counter()
    optimizer = torch.optim.AdamW(params, lr=t["lr"], weight_decay=t.get("weight_decay", 0.0))
    # fedlora's per-round seed (sha256 of seed|client|round), so both loops see the very same batches
    import hashlib

    seed = int.from_bytes(hashlib.sha256(f"{t['seed']}|{client_id}|1".encode()).digest()[:8], "little") % (2**63)
    rng = np.random.default_rng(seed)
    order, cursor, size = rng.permutation(len(texts)), 0, min(t["batch_size"], len(texts))
    model.train()
    for _ in range(t["local_steps"]):
        if cursor + size > len(texts):
            order, cursor = rng.permutation(len(texts)), 0
        rows = order[cursor : cursor + size]
        cursor += size
        batch = tokenizer([texts[i] for i in rows], padding=True, truncation=True,
                          max_length=recipe["data"]["max_length"], return_tensors="pt")
        loss = model(**batch, labels=torch.as_tensor(labels[rows], dtype=torch.long)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    loop_seconds = time.perf_counter() - loop_started
    Path(out).mkdir(parents=True, exist_ok=True)
    trained = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(trained, str(Path(out) / "update.safetensors"))
    return {"steps": t["local_steps"], "loop_seconds": loop_seconds}


def run(cmd: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"benchmark command failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--client", default="client-1")
    parser.add_argument("--dir", default="/tmp/fedlora-bench-train")
    parser.add_argument("--json", help="also write the raw results here")
    parser.add_argument("--plain-worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain_worker:
        print(json.dumps(plain_worker(*args.plain_worker)))
        return

    env = dict(os.environ, HF_HUB_OFFLINE="1")
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    fedlora = str(BIN / "fedlora")
    run([fedlora, "partition", "--recipe", "quickstart", "-o", str(root / "data")], env)
    run([fedlora, "init", "quickstart", "--data", str(root / "data"), "-o", str(root / "global")], env)
    shard = root / "data" / f"{args.client}.parquet"

    rows: dict[str, list[dict]] = {"plain": [], "fedlora": []}
    for i in range(args.repeats):
        for config in ("plain", "fedlora"):
            out = root / f"{config}-{i}"
            if config == "plain":
                cmd = [sys.executable, __file__, "--plain-worker", str(root / "global"), str(shard), str(out), args.client]
                started = time.perf_counter()
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                wall = time.perf_counter() - started
                if proc.returncode != 0:
                    sys.exit(f"plain worker failed:\n{proc.stderr[-2000:]}")
                result = json.loads(proc.stdout.strip().splitlines()[-1])
                steps, loop = result["steps"], result["loop_seconds"]
            else:
                wall = run([fedlora, "train-client", str(root / "global"), "--data", str(shard),
                            "--state", str(out / "state"), "--out", str(out / "update"), "--client-id", args.client], env)
                manifest = json.loads((out / "update" / "update.json").read_text())
                steps, loop = manifest["steps"], manifest["seconds"]
            rows[config].append({"wall_seconds": wall, "step_seconds": loop / steps, "steps": steps})
            print(f"  {config} repeat {i + 1}: {wall:.2f} s process, {loop / steps:.3f} s/step", flush=True)

    def median(config: str, key: str) -> float:
        return statistics.median(r[key] for r in rows[config])

    step_ratio = median("fedlora", "step_seconds") / median("plain", "step_seconds")
    wall_ratio = median("fedlora", "wall_seconds") / median("plain", "wall_seconds")
    threads = os.environ.get("OMP_NUM_THREADS", "default")
    print(f"\n# train-client overhead: quickstart round shape ({rows['plain'][0]['steps']} steps), {args.client}, "
          f"{args.repeats} repeats, OMP_NUM_THREADS={threads}")
    print(f"# {time.strftime('%Y-%m-%d')} on {platform.machine()}, {os.cpu_count()} cpus, python {platform.python_version()}")
    print("| | plain PEFT loop | fedlora train-client | ratio | target |")
    print("|---|---|---|---|---|")
    print(f"| s per step (median) | {median('plain', 'step_seconds'):.3f} | {median('fedlora', 'step_seconds'):.3f} | {step_ratio:.2f} | <= 1.10 |")
    print(f"| s per process (median) | {median('plain', 'wall_seconds'):.2f} | {median('fedlora', 'wall_seconds'):.2f} | {wall_ratio:.2f} | <= 1.25 |")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "date": time.strftime("%Y-%m-%d"), "threads": threads, "client": args.client,
            "step_ratio": step_ratio, "process_ratio": wall_ratio, "raw": rows,
        }, indent=2))


if __name__ == "__main__":
    main()
