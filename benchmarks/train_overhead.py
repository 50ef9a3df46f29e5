"""What `fedlora train-client` costs over the loops a user would otherwise run: a hand-written PEFT + torch loop
and the Hugging Face Trainer loop that FlowerTune, OpenFedLLM and NVFlare's examples run on each client.

    python benchmarks/train_overhead.py [--repeats 3] [--client client-1] [--dir /tmp/fedlora-bench-train]
        [--steps N] [--fedlora-flags "--accumulation-steps 4"] [--json f]

Set-up (not timed): the quickstart partition and round-0 global checkpoint, made with the fedlora CLI (with
``--steps N``, a round of N local steps instead of the recipe's 40: for smoke runs). Then, alternating in each
repeat, each in a fresh process:

    fedlora    `fedlora train-client GLOBAL --data SHARD --state S --out U` as a user runs it: start-up,
               recipe and checkpoint validation, model loading, the round's local steps, digests, writing the
               client update and the client state; ``--fedlora-flags`` adds train-client options, e.g.
               ``--accumulation-steps 4`` for micro-batches cut from the logical batch sorted by length
    plain      a minimal hand-written script doing the same work: load the tokenizer and model, attach the
               same LoRA config, load the global adapter tensors, freeze A, AdamW at the recipe's rate, the
               same number of steps over fedlora's seeded shuffled batches of the same size, each padded to its
               longest example, save the B tensors and head
    trainer    the same model and adapter trained by `transformers.Trainer`: the shard tokenized up front with
               truncation to the recipe's max_length, DataCollatorWithPadding (each batch padded to its longest
               example), AdamW (adamw_torch) at the recipe's constant rate and weight decay, no warm-up, the
               recipe's gradient clipping (none by default), max_steps the round's steps over full batches of the
               same size in the Trainer's own seeded shuffle, no evaluation, no checkpoints, no trackers; then
               the B tensors and head saved as plain saves them

Neither baseline imports fedlora. Both check, before they report a time, that every tensor they train changed
(B starts at zero in round 0); the Trainer worker also checks its optimizer steps, that every batch had the
batch size, and (over 10 steps or more) that its logged loss fell from the first half of the steps to the second.

Per-step time is the training loop's time divided by its steps (fedlora's from the update manifest, which times
its loop the same way; plain's measured around its loop, the Trainer's around `trainer.train()`, which includes
building its optimizer and data loader). Whole-process time is wall time from the parent. All run on the thread
count of the environment (set OMP_NUM_THREADS for a reproducible figure). Target (issue 17): fedlora's whole
process at most 0.85x the plain loop's and at most 0.85x the Trainer loop's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent


def _peft_from_global(global_dir: str) -> tuple[dict, Any, Any, dict]:
    """The recipe, tokenizer and PEFT model of a global checkpoint, set up as FFA-LoRA trains it: the base model,
    the recipe's LoRA config, the global adapter tensors, A frozen, B and the head trainable. Also returns a copy of
    the trainable tensors, to check afterwards that training moved every one of them."""
    import importlib.util

    import torch
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    recipe = json.loads((Path(global_dir) / "fedlora.json").read_text())["recipe"]
    base = recipe["model"]["base"]
    if base.startswith("pkg:"):
        # a folder inside an installed package, found without importing it (as fedlora resolves it)
        package, _, rest = base[4:].partition("/")
        base = str(Path(importlib.util.find_spec(package).submodule_search_locations[0]) / rest)
    a = recipe["adapter"]
    torch.manual_seed(recipe["training"]["seed"])
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=len(recipe["data"]["labels"]))
    model = get_peft_model(model, LoraConfig(
        r=a["r"], lora_alpha=a["alpha"], lora_dropout=a["dropout"], target_modules=a["target_modules"], task_type="SEQ_CLS",
    ))
    set_peft_model_state_dict(model, load_file(str(Path(global_dir) / "adapter_model.safetensors")))
    for name, p in model.named_parameters():
        p.requires_grad = "lora_B" in name or "modules_to_save" in name
    return recipe, tokenizer, model, _trained(model, copy=True)


def _trained(model: Any, copy: bool = False) -> dict:
    """The tensors that train, by name (copies with ``copy``, to compare with after training)."""
    return {n: (p.detach().clone() if copy else p.detach().contiguous()) for n, p in model.named_parameters()
            if p.requires_grad}


def _shard(recipe: dict, shard: str) -> tuple[list[str], Any]:
    """The shard's texts and label ids (partition writes the ids 0..K-1 in the recipe's label order)."""
    import pandas as pd

    frame = pd.read_parquet(shard)
    data = recipe["data"]
    return frame[data["text_column"]].astype(str).tolist(), frame[data["label_column"]].to_numpy()


def _save_checked(model: Any, before: dict, out: str) -> None:
    """Save the B tensors and head, after checking that training changed each of them: a loop whose gradients never
    reach them (or that takes no step) would otherwise report a fast time for doing nothing."""
    import torch
    from safetensors.torch import save_file

    trained = _trained(model)
    still = [n for n, p in trained.items() if torch.equal(p, before[n])]
    assert not still, f"training left {len(still)} of {len(trained)} trained tensors unchanged, e.g. {still[0]}"
    Path(out).mkdir(parents=True, exist_ok=True)
    save_file(trained, str(Path(out) / "update.safetensors"))


def plain_worker(global_dir: str, shard: str, out: str, client_id: str) -> dict:
    """The loop a user would write by hand (kept deliberately free of fedlora imports)."""
    import hashlib

    import numpy as np
    import torch

    recipe, tokenizer, model, before = _peft_from_global(global_dir)
    t = recipe["training"]
    texts, labels = _shard(recipe, shard)
    params = [p for p in model.parameters() if p.requires_grad]

    loop_started = time.perf_counter()
    optimizer = torch.optim.AdamW(params, lr=t["lr"], weight_decay=t.get("weight_decay", 0.0))
    # fedlora's per-round seed (sha256 of seed|client|round), so plain and fedlora see the very same batches
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
    _save_checked(model, before, out)
    return {"steps": t["local_steps"], "loop_seconds": loop_seconds}


def trainer_worker(global_dir: str, shard: str, out: str) -> dict:
    """The Hugging Face Trainer loop FlowerTune, OpenFedLLM and NVFlare's examples run on each client (kept free of
    fedlora imports): the same model and adapter as plain, the shard tokenized up front with truncation, batches
    padded to their longest example by DataCollatorWithPadding, AdamW at a constant rate. Its batches are the
    Trainer's own seeded shuffle, not fedlora's."""
    import torch
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    recipe, tokenizer, model, before = _peft_from_global(global_dir)
    t = recipe["training"]
    texts, labels = _shard(recipe, shard)
    encoded = tokenizer(texts, truncation=True, max_length=recipe["data"]["max_length"])
    dataset = [{**{k: v[i] for k, v in encoded.items()}, "labels": int(labels[i])} for i in range(len(texts))]
    steps, size = t["local_steps"], min(t["batch_size"], len(texts))

    pad = DataCollatorWithPadding(tokenizer)
    batch_sizes: list[int] = []

    def collate(features: list[dict]) -> dict:
        batch_sizes.append(len(features))
        return pad(features)

    args = TrainingArguments(
        output_dir=str(Path(out) / "trainer"), max_steps=steps, per_device_train_batch_size=size,
        # every step a full batch, as fedlora and plain take (a pass's last short batch would be less work)
        dataloader_drop_last=True,
        learning_rate=t["lr"], optim="adamw_torch", lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=t.get("weight_decay", 0.0), max_grad_norm=t.get("max_grad_norm") or 0.0, seed=t["seed"],
        report_to=[], eval_strategy="no", save_strategy="no",
        # two logged losses (the mean over each half of the steps) to check below that training lowers the loss
        logging_strategy="steps", logging_steps=max(1, steps // 2),
        dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(), disable_tqdm=True,
        remove_unused_columns=False,
    )
    trainer = Trainer(model=model, args=args, data_collator=collate, train_dataset=dataset, processing_class=tokenizer)
    loop_started = time.perf_counter()
    trainer.train()
    loop_seconds = time.perf_counter() - loop_started

    assert trainer.state.global_step == steps, f"Trainer took {trainer.state.global_step} optimizer steps, not {steps}"
    assert len(batch_sizes) >= steps and set(batch_sizes) == {size}, f"Trainer's batches: {batch_sizes}"
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert all(map(math.isfinite, losses)), f"Trainer's losses: {losses}"
    # over a handful of steps (a smoke run) the spread between batches can hide the fall
    if len(losses) >= 2 and steps >= 10:
        assert losses[-1] < losses[0], f"Trainer's loss did not fall: {losses}"
    _save_checked(model, before, out)
    return {"steps": steps, "loop_seconds": loop_seconds, "losses": losses}


CONFIGS = ("fedlora", "plain", "trainer")  # the order they run in, within each repeat
HEADS = {"plain": "plain PEFT loop", "trainer": "HF Trainer loop", "fedlora": "fedlora train-client"}
PROCESS_TARGET = 0.85  # issue 17: fedlora's whole process at most 0.85x either baseline's


def run(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    """Wall seconds of a command, and its stdout."""
    started = time.perf_counter()
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"benchmark command failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return seconds, proc.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--client", default="client-1")
    parser.add_argument("--dir", default="/tmp/fedlora-bench-train")
    parser.add_argument("--steps", type=int, help="local steps of the round instead of the recipe's (smoke runs)")
    parser.add_argument("--fedlora-flags", default="",
                        help='extra train-client options, e.g. "--accumulation-steps 4" (length-sorted micro-batches)')
    parser.add_argument("--json", help="also write the raw results here")
    parser.add_argument("--plain-worker", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--trainer-worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain_worker:
        print(json.dumps(plain_worker(*args.plain_worker)))
        return
    if args.trainer_worker:
        print(json.dumps(trainer_worker(*args.trainer_worker)))
        return

    env = dict(os.environ, HF_HUB_OFFLINE="1")
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    fedlora = str(BIN / "fedlora")
    steps_override = ["--set", f"training.local_steps={args.steps}"] if args.steps else []
    run([fedlora, "partition", "--recipe", "quickstart", "-o", str(root / "data")], env)
    run([fedlora, "init", "quickstart", "--data", str(root / "data"), "-o", str(root / "global"), *steps_override], env)
    shard, global_dir = root / "data" / f"{args.client}.parquet", str(root / "global")
    fedlora_flags = shlex.split(args.fedlora_flags)

    rows: dict[str, list[dict]] = {config: [] for config in CONFIGS}
    for i in range(args.repeats):
        for config in CONFIGS:
            out = root / f"{config}-{i}"
            extra = {}
            if config == "fedlora":
                wall, _ = run([fedlora, "train-client", global_dir, "--data", str(shard), "--state", str(out / "state"),
                               "--out", str(out / "update"), "--client-id", args.client, *fedlora_flags], env)
                manifest = json.loads((out / "update" / "update.json").read_text())
                steps, loop = manifest["steps"], manifest["seconds"]
            else:
                worker = [global_dir, str(shard), str(out), *([args.client] if config == "plain" else [])]
                wall, stdout = run([sys.executable, __file__, f"--{config}-worker", *worker], env)
                result = json.loads(stdout.strip().splitlines()[-1])
                steps, loop = result.pop("steps"), result.pop("loop_seconds")
                extra = result
            rows[config].append({"wall_seconds": wall, "step_seconds": loop / steps, "steps": steps, **extra})
            print(f"  {config} repeat {i + 1}: {wall:.2f} s process, {loop / steps:.3f} s/step", flush=True)
    steps = {r["steps"] for config in CONFIGS for r in rows[config]}
    assert len(steps) == 1, f"the loops took different numbers of steps: {steps}"

    def median(config: str, key: str) -> float:
        return statistics.median(r[key] for r in rows[config])

    ratios = {base: {key: median("fedlora", f"{key}_seconds") / median(base, f"{key}_seconds") for key in ("step", "wall")}
              for base in ("plain", "trainer")}
    threads = os.environ.get("OMP_NUM_THREADS", "default")
    flags = f", train-client {args.fedlora_flags}" if args.fedlora_flags else ""
    print(f"\n# train-client overhead: quickstart round shape ({steps.pop()} steps), {args.client}{flags}, "
          f"{args.repeats} repeats, OMP_NUM_THREADS={threads}")
    print(f"# {time.strftime('%Y-%m-%d')} on {platform.machine()}, {os.cpu_count()} cpus, python {platform.python_version()}")
    print(f"| | {' | '.join(HEADS[c] for c in ('plain', 'trainer', 'fedlora'))} | fedlora / plain | fedlora / Trainer "
          "| target |")
    print("|---|---|---|---|---|---|---|")
    for key, label, digits, target in (("step", "s per step", 3, "-"), ("wall", "s per process", 2,
                                                                         f"<= {PROCESS_TARGET} both")):
        cells = " | ".join(f"{median(c, f'{key}_seconds'):.{digits}f}" for c in ("plain", "trainer", "fedlora"))
        print(f"| {label} (median) | {cells} | {ratios['plain'][key]:.2f} | {ratios['trainer'][key]:.2f} | {target} |")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "date": time.strftime("%Y-%m-%d"), "threads": threads, "client": args.client,
            "fedlora_flags": args.fedlora_flags,
            "step_ratio": ratios["plain"]["step"], "process_ratio": ratios["plain"]["wall"],
            "trainer_step_ratio": ratios["trainer"]["step"], "trainer_process_ratio": ratios["trainer"]["wall"],
            "raw": rows,
        }, indent=2))


if __name__ == "__main__":
    main()
