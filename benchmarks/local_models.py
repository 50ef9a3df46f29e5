"""FedAvg-LoRA's and FFA-LoRA's own personalised models, scored after the fact from finished run folders.

    python benchmarks/local_models.py RUN [RUN ...] [--threads 1] [--json local.json]
    python benchmarks/local_models.py --summarise a.json b.json ...   # one table over files written by lanes

A method that keeps nothing at home has no personalised model of its own, but each client's model after its last
local training is one, for free: the global checkpoint of round N-1 with the client's round-N client update loaded
over it (FedAvg: A, B and the shared head; FFA: B and the head, A frozen and equal to the global's), that is the
round N-1 global fine-tuned for ``training.local_steps`` steps on the client's own data. For the final round N of
each run folder written by ``fedlora simulate`` (or ``benchmarks/quality.py``) and each client that trained in it,
this loads that model as the core loads a client's model (the update checked against its parent global as
``aggregate`` checks it: manifest, parent and frozen digests, tensor header, digests, finite values), scores it
on the run's test and validation splits, and reweights its class recalls to the client's own label mix
(:func:`fedlora_cli.model.evaluation.accuracy_on_mix`), as simulate scores FedSA-LoRA's personalised models.

Per run: the mean over clients of own-mix test accuracy, own-mix validation accuracy and plain test accuracy, and
beside them the round-N global model's own-mix figures and the majority-class floor (``quality.global_on_own_mix``,
from the run's metrics file). The table groups runs by (configuration, partition, epsilon, rate) with the mean and
range over seeds (``quality.summary``). FedSA-LoRA runs (and any method or head policy that keeps a client state)
are refused: simulate already scores their personalised models. So are unfinished runs and runs whose updates are
encoded (bfloat16/int8: the client's exact model is not on disk). Costs about two test-split evaluations per client.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import global_on_own_mix, summary  # noqa: E402

SPLITS = ("test", "validation")


def finished_run(run: Path) -> tuple[Any, int]:
    """The run's layout and its final round N, or a FedloraError saying in one line why it cannot be scored."""
    from fedlora_cli import storage
    from fedlora_cli.data.partition import PARTITION_MANIFEST
    from fedlora_cli.errors import FedloraError
    from fedlora_cli.federation.common import Global

    layout = storage.RunLayout(Path(run))
    checkpoints = layout.global_checkpoints() if layout.is_run() else []
    if not checkpoints or not (layout.data / PARTITION_MANIFEST).is_file():
        raise FedloraError(f"{run} is not a run folder of fedlora simulate (no global/ rounds or data/partition.json)")
    final = Global.of(checkpoints[-1])
    n, rounds = final.manifest.round, final.recipe.federation.rounds
    if n < 1 or n != rounds or not layout.metrics(n).is_file():
        raise FedloraError(f"{run} is not a finished run (round {n} of {rounds}, or no metrics for it)")
    if not final.plan.global_is_model:
        raise FedloraError(f"{run}: {final.plan.why_global_is_partial()}; its personalised models are the global plus "
                           "each client's state, which simulate already scores (personalised_accuracy_own_mix)")
    encoding = final.recipe.federation.update_encoding
    if encoding != "float32":
        raise FedloraError(f"{run}: its client updates are encoded ({encoding}), so the clients' exact models are not "
                           "on disk")
    if final.recipe.federation.secure_aggregation is not None:
        raise FedloraError(f"{run}: under secure aggregation no client update reaches the run folder")
    if not any((layout.root / storage.UPDATES_DIR / storage.round_dirname(n)).glob("*")):
        raise FedloraError(f"{run} holds no client updates of its final round {n}")
    return layout, n


def describe(recipe: Any) -> dict[str, Any]:
    """The run's cell as quality.py names it: configuration, partition, epsilon, rate, seed."""
    data = recipe.data
    partition = "iid" if data.strategy == "iid" else f"{data.strategy}-{data.alpha:g}" if data.alpha else data.strategy
    epsilon = recipe.privacy.target_epsilon if recipe.privacy is not None else None
    return {"config": f"{recipe.federation.method}-{recipe.adapter.kind}", "partition": partition,
            "privacy": "none" if epsilon is None else f"{epsilon:g}", "rate": recipe.training.lr,
            "seed": recipe.training.seed}


def load_local_model(parent: Any, update_dir: Path, benches: dict[int, Any], site: dict[str, Any]) -> Any:
    """A workbench holding one client's model after its last local training: the parent global as the client
    received it (correction, adapter at its rank), overlaid with its client update's tensors, which are checked
    first as aggregate checks them and read through their digests."""
    from fedlora_cli import storage
    from fedlora_cli.federation.common import bench_for, load_client_model
    from fedlora_cli.federation.server import check_update

    update = check_update(parent, update_dir)
    tensors = storage.load_verified(update.tensors_path, update.manifest.tensor_digests, "client update tensors")
    rank = parent.recipe.adapter.rank_for(update.manifest.client_id)
    bench = benches[rank] = bench_for(parent, None, benches.get(rank), rank, site)
    load_client_model(bench, parent.plan, parent.verified_tensors, None, parent.verified_correction)
    bench.load_adapter_tensors(tensors, partial=True)
    bench.model.eval()
    return bench


def held_out(layout: Any, parent: Any) -> dict[str, Any]:
    """The run's test and validation examples (validation absent when the run held none out)."""
    from fedlora_cli.data.examples import read_examples
    from fedlora_cli.federation.evaluate import held_out_path, validation_of

    splits = [s for s in SPLITS if s == "test" or validation_of(layout.data) is not None]
    return {s: read_examples(held_out_path(layout.data, s), parent.recipe.data, parent.recipe.model.task,
                             parent.manifest.num_labels, parent.label_names) for s in splits}


def score_clients(layout: Any, n: int, site: dict[str, Any]) -> list[dict[str, Any]]:
    """Every client of round N: its local model's scores on each split, plain and on its own label mix."""
    from fedlora_cli import storage
    from fedlora_cli.data.partition import PARTITION_MANIFEST
    from fedlora_cli.federation.common import Global
    from fedlora_cli.model import evaluation

    parent = Global.of(layout.global_checkpoint(n - 1)).verify()
    partition = storage.read_json(layout.data / PARTITION_MANIFEST, "partition manifest")
    mixes = {c["id"]: c["label_counts"] for c in partition["clients"]}
    examples = held_out(layout, parent)
    benches: dict[int, Any] = {}
    rows = []
    for update_dir in sorted(p for p in (layout.root / storage.UPDATES_DIR / storage.round_dirname(n)).iterdir()
                             if p.is_dir()):
        bench = load_local_model(parent, update_dir, benches, site)
        cid = update_dir.name
        row: dict[str, Any] = {"client": cid, "label_counts": mixes[cid]}
        for split, data in examples.items():
            scores = evaluation.evaluate(bench, data)
            row[split] = {key: scores[key] for key in ("accuracy", "loss", "class_recall")}
            row[split]["own_mix"] = evaluation.accuracy_on_mix(scores["class_recall"], mixes[cid])
        print(f"  {cid}: test {row['test']['accuracy']:.4f}, own mix {row['test']['own_mix']:.4f}", flush=True)
        rows.append(row)
    return rows


def score_run(run: Path, site: dict[str, Any]) -> dict[str, Any]:
    """One run's per-client local models and their means, beside the round-N global's own-mix figures."""
    from fedlora_cli.federation.common import Global

    started = time.perf_counter()
    layout, n = finished_run(run)
    clients = score_clients(layout, n, site)

    def mean(split: str, key: str) -> float | None:
        values = [c[split][key] for c in clients if split in c]
        return None if not values or None in values else statistics.fmean(values)

    return {"run": str(run), **describe(Global.of(layout.global_checkpoint(n)).recipe), "round": n,
            "clients": len(clients), "local_own_mix": mean("test", "own_mix"),
            "validation_local_own_mix": mean("validation", "own_mix"), "local": mean("test", "accuracy"),
            "validation_local": mean("validation", "accuracy"), **global_on_own_mix(layout.root, n),
            "global": json.loads(layout.metrics(n).read_text())["global"]["accuracy"],
            "per_client": clients, "seconds": time.perf_counter() - started}


def save(path: str | None, runs: list[dict[str, Any]]) -> None:
    """Write the runs so far, atomically: a long list stopped midway keeps what it finished."""
    from fedlora_cli import storage

    if path:
        with storage.atomic_file(Path(path)) as tmp:
            tmp.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "machine": platform.node(),
                                       "runs": runs}, indent=2) + "\n")


def table(runs: list[dict[str, Any]]) -> None:
    """One row per (configuration, partition, epsilon, rate): mean and range over its runs (seeds)."""
    cells: dict[tuple, list[dict[str, Any]]] = {}
    for r in runs:
        cells.setdefault((r["config"], r["partition"], r["privacy"], r["rate"]), []).append(r)
    print("| configuration | partition | epsilon | rate | local, own mix: validation | local, own mix: test "
          "| local: test | global, own mix: validation | global, own mix: test | global: test "
          "| majority class, own mix |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for (config, partition, privacy, rate), rs in sorted(cells.items(), key=lambda kv: tuple(map(str, kv[0]))):
        columns = ("validation_local_own_mix", "local_own_mix", "local", "validation_global_own_mix",
                   "global_own_mix", "global", "majority_own_mix")
        values = " | ".join(summary([r.get(c) for r in rs]) for c in columns)
        print(f"| {config} | {partition} | {privacy} | {rate:g} | {values} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", type=Path, help="run folders of fedlora simulate (FedAvg/FFA, finished)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads torch evaluates with (default: "
                        "the recipe's training.threads)")
    parser.add_argument("--json", help="write the per-run figures here (after every run)")
    parser.add_argument("--summarise", nargs="+", metavar="JSON", help="print one table over these result files")
    args = parser.parse_args()
    if args.summarise:
        table([r for path in args.summarise for r in json.loads(Path(path).read_text())["runs"]])
        return
    if not args.runs:
        parser.error("give run folders, or --summarise result files")
    from fedlora_cli.errors import FedloraError, first_line

    refused = []
    for run in args.runs:  # every folder checked before any is scored: a bad one in a long list fails at once
        try:
            finished_run(run)
        except FedloraError as exc:
            refused.append(f"refused: {first_line(exc)}")
    if refused:
        sys.exit("\n".join(refused))
    site = {} if args.threads is None else {"training.threads": args.threads}
    runs: list[dict[str, Any]] = []
    for run in args.runs:
        print(f"{run}", flush=True)
        try:
            runs.append(score_run(run, site))
        except FedloraError as exc:  # a bad client update, say: one line, the runs before it kept in --json
            sys.exit(f"refused: {run}: {first_line(exc)}")
        save(args.json, runs)
    print(f"\n# Local models (each client's after its last local training), {time.strftime('%Y-%m-%d')}, "
          f"{platform.machine()} python {platform.python_version()} (mean, min-max over seeds)")
    table(runs)


if __name__ == "__main__":
    main()
