"""The ``fedlora`` command: thin wiring from options to :mod:`fedlora_cli.federation` and friends.

Commands import the core inside their bodies, so ``fedlora --help`` never loads torch or transformers.
A :class:`~fedlora_cli.errors.FedloraError` becomes one red line on stderr and exit code 1; set
``FEDLORA_DEBUG=1`` to see the traceback instead.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from fedlora_cli import __version__
from fedlora_cli.cli_options import BaseModelOpt, JsonOpt, OverwriteOpt, SetOpt
from fedlora_cli.errors import FedloraError

app = typer.Typer(
    name="fedlora",
    help="Federated LoRA fine-tuning (FedAvg-LoRA, FFA-LoRA, FedSA-LoRA; LoRA, rsLoRA, VeRA) on on-disk checkpoints.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="rich",
)
recipes_app = typer.Typer(help="List, show, copy and validate recipes.", no_args_is_help=True)
app.add_typer(recipes_app, name="recipes")
privacy_app = typer.Typer(help="Differential privacy: spending reports and noise planning.", no_args_is_help=True)
app.add_typer(privacy_app, name="privacy")


def _fail(message: str) -> None:
    from fedlora_cli import ui

    ui.err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)


def command(target: typer.Typer, name: str | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a command whose user errors print one line and exit 1 instead of a traceback."""

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if os.environ.get("FEDLORA_DEBUG"):
                return func(*args, **kwargs)
            try:
                return func(*args, **kwargs)
            except FedloraError as exc:
                _fail(str(exc))
                raise typer.Exit(1) from None
            except KeyboardInterrupt:
                _fail("interrupted; completed folders are kept, partial ones were removed")
                raise typer.Exit(130) from None
            except (typer.Exit, typer.Abort, SystemExit):
                raise
            except Exception as exc:  # an unexpected failure still gets one line; FEDLORA_DEBUG=1 shows where
                _fail(f"{exc.__class__.__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''} "
                      "(internal error; rerun with FEDLORA_DEBUG=1 for the traceback)")
                raise typer.Exit(1) from None

        return target.command(name)(wrapper)

    return decorate


def _version(value: bool) -> None:
    if value:
        print(f"fedlora {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Federated LoRA fine-tuning on on-disk checkpoints.

    A round: every client runs [bold]train-client[/] on the current global checkpoint and its own data shard;
    the coordinator runs [bold]aggregate[/] on their client updates to write the next global checkpoint.
    [bold]simulate[/] runs a whole federation on one machine with the same folders.
    """


def _load_recipe(path: Path, sets: list[str] | None, extra: dict[str, Any] | None = None):
    from fedlora_cli import recipe as recipes

    overrides = dict(recipes.parse_override(s) for s in sets or [])
    overrides.update({k: v for k, v in (extra or {}).items() if v is not None})
    return recipes.load(_recipe_path(path), overrides)


def _recipe_path(path: Path) -> Path:
    """A recipe file, or the name of a shipped recipe (``quickstart`` for recipes/quickstart.yaml)."""
    from fedlora_cli.recipes_catalog import find

    return path if path.exists() or path.suffix in (".yaml", ".yml") else find(str(path))


# partition -----------------------------------------------------------------------------------------------

MAX_COUNT_COLUMNS = 10  # label or category values shown as a column each in the partition table


@command(app, "partition")
def partition_cmd(
    source: Annotated[Optional[str], typer.Argument(help="Hub dataset, CSV/JSON/Parquet file, or save_to_disk folder.")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write the shards and manifest to.")] = Path("data"),
    recipe: Annotated[Optional[Path], typer.Option("--recipe", "-r", help="Take data settings from this recipe.")] = None,
    clients: Annotated[Optional[int], typer.Option("--clients", "-n", help="Number of clients.")] = None,
    strategy: Annotated[Optional[str], typer.Option(help="iid, dirichlet, natural or size.")] = None,
    alpha: Annotated[Optional[float], typer.Option(help="Dirichlet concentration (0.5 default, 0.1 severe).")] = None,
    by: Annotated[
        Optional[str],
        typer.Option(help="Category column: the clients for --strategy natural; the skew for dirichlet on causal-lm data."),
    ] = None,
    sizes: Annotated[
        Optional[str], typer.Option(help="--strategy size: comma-separated relative client sizes, e.g. 0.5,0.3,0.2.")
    ] = None,
    task: Annotated[
        Optional[str], typer.Option(help="sequence-classification (labelled texts) or causal-lm (prompt/response pairs).")
    ] = None,
    text_column: Annotated[Optional[str], typer.Option(help="Text column.")] = None,
    label_column: Annotated[Optional[str], typer.Option(help="Label column.")] = None,
    labels: Annotated[Optional[str], typer.Option(help="Comma-separated label values to keep, in id order.")] = None,
    prompt_column: Annotated[Optional[str], typer.Option(help="causal-lm: prompt column.")] = None,
    response_column: Annotated[Optional[str], typer.Option(help="causal-lm: response column.")] = None,
    answer_column: Annotated[Optional[str], typer.Option(help="causal-lm: final-answer column (kept in the shards).")] = None,
    test_fraction: Annotated[Optional[float], typer.Option(help="Held-out test fraction.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Partition seed.")] = None,
    split: Annotated[Optional[str], typer.Option(help="Split of a Hub dataset or DatasetDict.")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="Write a PNG of the label distribution here.")] = None,
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Split a dataset across clients and hold out a test split: labelled texts, or prompt/response pairs.

    Example: [cyan]fedlora partition reviews.csv --label-column sentiment -n 4 --strategy dirichlet --alpha 0.5 -o data[/]

    Example: [cyan]fedlora partition gsm.jsonl --task causal-lm --prompt-column question -n 3 --strategy size --sizes 0.6,0.3,0.1[/]
    """
    from fedlora_cli import partition as partitions, recipe as recipes, ui

    overrides = {
        "data.source": source, "data.strategy": strategy, "data.alpha": alpha, "data.by": by, "data.sizes": sizes,
        "data.text_column": text_column, "data.label_column": label_column, "data.labels": labels,
        "data.prompt_column": prompt_column, "data.response_column": response_column,
        "data.answer_column": answer_column, "data.test_fraction": test_fraction, "data.seed": seed, "data.split": split,
    }
    if recipe is not None:
        r = _load_recipe(recipe, None, {**overrides, "model.task": task})
        spec, n, task = r.data, clients or r.federation.clients, r.model.task
    else:
        n = clients or (len(sizes.split(",")) if sizes else 2)
        model = {"base": "-", **({"task": task} if task else {})}
        raw = {"model": model, "federation": {"clients": n}}
        raw = recipes.apply_overrides(raw, {k: v for k, v in overrides.items() if v is not None})
        r = recipes.from_dict(raw)
        spec, task = r.data, r.model.task
    if plot is not None:
        # Checked before the partition is written, so a bad --plot path does not fail after the work is done.
        try:
            plot.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FedloraError(f"cannot write the plot to {plot}: {exc.strerror}") from None
    with ui.err.status("partitioning"):
        result = partitions.partition(spec, n, out, overwrite=overwrite, task=task)
    m = result.manifest
    if plot is not None:
        from fedlora_cli import plots

        plots.label_distribution(m, plot)
    if as_json:
        ui.print_json(m)
        return
    names = [str(x) for x in m["label_names"]]
    title = f"{m['strategy']} partition of {m['source']} (seed {m['seed']})"
    if len(names) <= MAX_COUNT_COLUMNS:
        rows = [[c["id"], c["examples"], *c["label_counts"]] for c in m["clients"]]
        rows.append(["test", m["test"]["examples"], *m["test"]["label_counts"]])
        ui.out.print(ui.table(title, ["client", "examples", *names], rows))
    else:
        # Too many categories for a column each: how many each client holds, and its largest share.
        def summary(entry: dict) -> list:
            counts = entry["label_counts"]
            return [sum(1 for c in counts if c), f"{max(counts) / max(entry['examples'], 1):.2f}"]

        rows = [[c["id"], c["examples"], *summary(c)] for c in m["clients"]]
        rows.append(["test", m["test"]["examples"], *summary(m["test"])])
        column = m["label_column"]
        ui.out.print(ui.table(title, ["client", "examples", f"{column} values", f"largest {column} share"], rows))
    ui.err.print(f"wrote {out}" + (f" and {plot}" if plot else ""))


# init ----------------------------------------------------------------------------------------------------


@command(app, "init")
def init_cmd(
    recipe: Annotated[Path, typer.Argument(help="Recipe file or shipped recipe name.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder of the round-0 global checkpoint.")],
    data: Annotated[Optional[Path], typer.Option("--data", help="Partition folder (gives the label names).")] = None,
    sets: SetOpt = None,
    base_model: BaseModelOpt = None,
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Create the round-0 global checkpoint: the adapter with its seeded random A, a folder PEFT loads."""
    from fedlora_cli import federation, partition as partitions, ui

    r = _load_recipe(recipe, sets)
    part = partitions.read_manifest(data) if data is not None else None
    with ui.err.status(f"loading {r.model.base}"):
        ckpt = federation.init(r, out, partition=part, base_override=base_model, overwrite=overwrite)
    _show_global(ckpt, as_json)


def _show_global(ckpt, as_json: bool) -> None:
    from dataclasses import asdict

    from fedlora_cli import ui

    m = ckpt.manifest
    if as_json:
        ui.print_json({"path": str(ckpt.path), **{k: v for k, v in asdict(m).items() if k != "tensor_digests"}})
        return
    rows = [
        ["round", m.round], ["method", m.method], ["adapter", f"{m.adapter_kind} r={m.recipe['adapter']['r']}"],
        ["aggregation", m.recipe["federation"].get("aggregation", "mean")], ["head", m.head], ["base model", m.base_model],
        ["tensors", len(m.tensor_digests)], ["digest", m.digest[:16]],
        ["frozen digest", (m.frozen_digest or "-")[:16]], ["clients", ", ".join(m.clients) or "-"],
    ]
    ui.out.print(ui.table(f"global checkpoint {ckpt.path}", ["field", "value"], rows))


# train-client --------------------------------------------------------------------------------------------


@command(app, "train-client")
def train_client_cmd(
    global_checkpoint: Annotated[Path, typer.Argument(help="The current global checkpoint folder.")],
    data: Annotated[Path, typer.Option("--data", "-d", help="This client's shard (Parquet, from fedlora partition).")],
    state: Annotated[Path, typer.Option("--state", help="This client's private state folder (created if new).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder of the client update to send.")],
    client_id: Annotated[Optional[str], typer.Option("--client-id", help="Client id; default: the state folder's name.")] = None,
    base_model: BaseModelOpt = None,
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Train this client for one round; write the client update (sent) and the client state (kept)."""
    from dataclasses import asdict

    from fedlora_cli import checkpoint, federation, ui

    cid = client_id or state.resolve().name
    with ui.step_progress(f"training {cid}") as progress:
        update = federation.train_client(
            global_checkpoint, data, state, out, cid, base_override=base_model, progress=progress, overwrite=overwrite
        )
    m = update.manifest
    # The loss as this client saw it: under DP-SGD the update does not carry it, the client's state does.
    local_loss = checkpoint.latest_state(state, before_round=m.round + 1).manifest.loss
    if as_json:
        ui.print_json({"path": str(update.path), **{k: v for k, v in asdict(m).items() if k != "tensor_digests"},
                       "local_loss": local_loss})
        return
    rows = [[m.client_id, m.round, m.num_examples, m.steps, ui.fmt(local_loss), f"{m.seconds:.1f}", ui.fmt_bytes(m.bytes)]]
    ui.out.print(ui.table(f"client update {update.path}", ["client", "round", "examples", "steps", "loss", "seconds", "upload"], rows))
    if m.privacy is not None:
        p = m.privacy
        budget = f" of {p['budget']:g} (remaining {p['remaining']:.3f})" if p["budget"] is not None else ""
        ui.out.print(f"privacy: epsilon {p['epsilon']:.3f}{budget} at delta {p['delta']:g}, {p['accountant']} accountant")


# aggregate -----------------------------------------------------------------------------------------------


@command(app, "aggregate")
def aggregate_cmd(
    global_checkpoint: Annotated[Path, typer.Argument(help="The global checkpoint the clients trained from.")],
    updates: Annotated[list[Path], typer.Argument(help="Client update folders of this round.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder of the next global checkpoint.")],
    weighting: Annotated[
        Optional[str],
        typer.Option(help="examples (trained this round), shard (shard size) or uniform; default: the recipe's."),
    ] = None,
    strategy: Annotated[
        Optional[str],
        typer.Option(help="mean, svd, exact, median or trimmed-mean; default: the recipe's federation.aggregation."),
    ] = None,
    trim_fraction: Annotated[
        Optional[float], typer.Option(help="trimmed-mean: fraction of clients dropped at each end of every coordinate.")
    ] = None,
    norm_bound: Annotated[
        Optional[float],
        typer.Option(help="Clip or reject client updates whose difference from the global is larger than this L2 norm."),
    ] = None,
    norm_bound_action: Annotated[Optional[str], typer.Option(help="clip or reject (with --norm-bound).")] = None,
    dp_clip: Annotated[
        Optional[float], typer.Option(help="DP-FedAvg: clip each client's update to this L2 norm (with --dp-noise).")
    ] = None,
    dp_noise: Annotated[Optional[float], typer.Option(help="DP-FedAvg: noise multiplier (std = noise * clip / clients).")] = None,
    dp_delta: Annotated[float, typer.Option(help="DP-FedAvg: delta of the client-level guarantee.")] = 1e-5,
    server_ledger: Annotated[
        Optional[Path],
        typer.Option(help="DP-FedAvg: the coordinator's ledger of releases [default: dp-fedavg-ledger-*.json beside GLOBAL_CHECKPOINT]."),
    ] = None,
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Validate the client updates and combine them into the next global checkpoint.

    --strategy svd or exact also reports, per layer, how far averaging A and B apart would have been from
    the weighted mean of the products B_k A_k. With --dp-clip and --dp-noise (or a server_privacy recipe
    section) it runs DP-FedAvg and reports the client-level epsilon spent so far, counting every release
    recorded in the coordinator's ledger (a round aggregated twice counts twice).

    Example: [cyan]fedlora aggregate global/round-002 updates/round-003/* --out global/round-003 --strategy median[/]
    """
    from dataclasses import asdict

    from fedlora_cli import federation, recipe as recipes, ui

    server_privacy = None
    if (dp_clip is None) != (dp_noise is None):
        raise FedloraError("--dp-clip and --dp-noise go together")
    if dp_clip is not None:
        server_privacy = recipes.ServerPrivacySection(clip_norm=dp_clip, noise_multiplier=dp_noise, delta=dp_delta)
        if dp_clip <= 0 or dp_noise < 0 or not 0 < dp_delta < 1:
            raise FedloraError("--dp-clip must be > 0, --dp-noise >= 0 and --dp-delta in (0, 1)")
    with ui.err.status("aggregating"):
        result = federation.aggregate_round(
            global_checkpoint, updates, out, weighting=weighting, server_privacy=server_privacy, overwrite=overwrite,
            strategy=strategy, norm_bound=norm_bound, norm_bound_action=norm_bound_action, trim_fraction=trim_fraction,
            server_ledger=server_ledger,
        )
    m = result.checkpoint.manifest
    if as_json:
        ui.print_json({"path": str(result.checkpoint.path), "round": m.round, "digest": m.digest,
                       "server_epsilon": result.server_epsilon, "aggregation": m.aggregation,
                       "server_ledger": None if result.server_ledger is None else str(result.server_ledger),
                       "clients": [asdict(r) for r in result.clients]})
        return
    columns = ["client", "examples", "shard", "weight", "update norm", "bytes", "train loss"]
    rows = [[r.client_id, r.num_examples, r.shard_examples, f"{r.weight:.4f}", f"{r.update_norm:.4f}", ui.fmt_bytes(r.bytes), ui.fmt(r.loss)]
            for r in result.clients]
    if any(r.rank is not None for r in result.clients) and len({r.rank for r in result.clients}) > 1:
        columns.append("rank")
        for row, r in zip(rows, result.clients):
            row.append(r.rank)
    if m.aggregation and m.aggregation.get("norm_bound") is not None:
        columns.append("norm bound")
        for row, r in zip(rows, result.clients):
            row.append(r.bound or "kept")
    title = f"round {m.round} ({result.strategy}) -> {result.checkpoint.path}"
    ui.out.print(ui.table(title, columns, rows))
    if result.layers:
        prefix, names = ui.common_prefix(list(result.layers))
        svd = result.strategy == "svd"
        layer_rows = [[name, ui.fmt(r.mean_error), *([ui.fmt(r.truncation_error), ui.fmt(r.rank)] if svd else [])]
                      for name, r in zip(names, result.layers.values())]
        ui.out.print(ui.table(
            f"per layer ({prefix}.*): error of plain averaging ||avg(B) avg(A) - avg(BA)|| / ||avg(BA)||"
            + ("; svd error of the rank-r result; rank of avg(BA)" if svd else ""),
            ["layer", "mean error", *(["svd error", "rank"] if svd else [])], layer_rows,
        ))
    if result.server_epsilon is not None:
        releases = len(m.server_privacy_ledger)
        ui.out.print(f"DP-FedAvg: client-level epsilon spent so far {result.server_epsilon:.3f} "
                     f"({releases} release{'s' if releases != 1 else ''}, ledger {result.server_ledger})")


# evaluate ------------------------------------------------------------------------------------------------


@command(app, "evaluate")
def evaluate_cmd(
    global_checkpoint: Annotated[Path, typer.Argument(help="Global checkpoint folder.")],
    data: Annotated[Path, typer.Option("--data", "-d", help="Test Parquet file, or a partition folder (its test split).")],
    state: Annotated[Optional[Path], typer.Option("--state", help="Evaluate personalised: this client's state folder.")] = None,
    client_id: Annotated[Optional[str], typer.Option("--client-id", help="Client id of --state (checked).")] = None,
    max_new_tokens: Annotated[
        Optional[int], typer.Option(help="causal-lm: cap on generated tokens; default: the recipe's evaluation.max_new_tokens.")
    ] = None,
    generate_examples: Annotated[
        Optional[int], typer.Option(help="causal-lm: generate for the first N test examples only (loss uses all).")
    ] = None,
    answer: Annotated[
        Optional[str], typer.Option(help="causal-lm: 'number' (exact match on the final number) or 'none' (loss only).")
    ] = None,
    base_model: BaseModelOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Metrics of the global model, or personalised for one client (global + its state).

    sequence-classification: accuracy, macro-F1 and loss. causal-lm: loss and perplexity per response token,
    and with an answer extractor, exact match of greedy generations.
    """
    import dataclasses

    from fedlora_cli import checkpoint, federation, recipe as recipes, ui

    settings = None
    if max_new_tokens is not None or generate_examples is not None or answer is not None:
        recipe = federation.recipe_of(checkpoint.read_global(global_checkpoint).manifest)
        if recipe.model.task != recipes.TASK_CAUSAL_LM:
            raise FedloraError("--max-new-tokens, --generate-examples and --answer apply to a causal-lm federation")
        overrides = {"max_new_tokens": max_new_tokens, "generate_examples": generate_examples, "answer": answer}
        settings = dataclasses.replace(recipe.evaluation, **{k: v for k, v in overrides.items() if v is not None})
        recipes.validate(dataclasses.replace(recipe, evaluation=settings))
    with ui.step_progress("evaluating") as progress:
        metrics = federation.evaluate(
            global_checkpoint, data, state_dir=state, client_id=client_id, base_override=base_model,
            progress=lambda done, total: progress(done, total), settings=settings,
        )
    if as_json:
        ui.print_json(metrics)
        return
    who = f"personalised ({state})" if state else "global"
    if metrics["task"] == recipes.TASK_CAUSAL_LM:
        em = "-" if metrics["exact_match"] is None else f"{ui.fmt(metrics['exact_match'])} ({metrics['scored']})"
        rows = [[who, metrics["round"], metrics["examples"], ui.fmt(metrics["loss"]), ui.fmt(metrics["perplexity"], 2),
                 em, metrics["hit_cap"] if metrics["generated"] else "-"]]
        columns = ["model", "round", "examples", "loss/token", "perplexity", "exact match (n)", "hit token cap"]
    else:
        rows = [[who, metrics["round"], metrics["examples"], ui.fmt(metrics["accuracy"]), ui.fmt(metrics["macro_f1"]),
                 ui.fmt(metrics["loss"])]]
        columns = ["model", "round", "examples", "accuracy", "macro-F1", "loss"]
    ui.out.print(ui.table(f"evaluation of {global_checkpoint}", columns, rows))


# simulate ------------------------------------------------------------------------------------------------


@command(app, "simulate")
def simulate_cmd(
    recipe: Annotated[Path, typer.Argument(help="Recipe file or shipped recipe name (see fedlora recipes list).")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Run folder; default runs/<recipe name>.")] = None,
    sets: SetOpt = None,
    rounds: Annotated[Optional[int], typer.Option(help="Override federation.rounds.")] = None,
    clients: Annotated[Optional[int], typer.Option(help="Override federation.clients.")] = None,
    method: Annotated[Optional[str], typer.Option(help="Override federation.method (fedavg, ffa, fedsa).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Delete the run folder and start again.")] = False,
    plot: Annotated[
        Optional[Path], typer.Option(help="Write a PNG of the learning curves here (default: RUN/metrics/rounds.png).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Run a whole federation on this machine; re-running resumes after the last completed step."""
    from fedlora_cli import plots, recipe as recipes, simulate as sim, ui

    r = _load_recipe(recipe, sets, {"federation.rounds": rounds, "federation.clients": clients, "federation.method": method})
    run_dir = out or Path("runs") / r.name
    if plot is not None:
        # Checked before the federation runs, so a bad --plot path does not fail after the work is done.
        try:
            plot.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FedloraError(f"cannot write the plot to {plot}: {exc.strerror}") from None
    rows = sim.simulate(r, run_dir, ui.SimulationReporter(quiet=as_json), overwrite=overwrite)
    png = plot or sim.RunLayout(run_dir).curves
    score = "exact match" if r.model.task == recipes.TASK_CAUSAL_LM else "test accuracy"
    plots.round_curves(rows, png, f"{r.name}: {r.federation.method}, {r.federation.clients} clients", score)
    if as_json:
        ui.print_json({"run": str(run_dir), "rounds": rows, "plot": str(png)})
        return
    if r.model.task == recipes.TASK_CAUSAL_LM:
        # A causal LM: test loss (per response token) and exact match instead of accuracy and macro-F1.
        table_rows = [
            [row["round"], ui.fmt(row["train_loss"]), ui.fmt(row["global_loss"]), ui.fmt(row["global_accuracy"]),
             ui.fmt(row["personalised_loss"]), ui.fmt(row["personalised_accuracy"]),
             ui.fmt_bytes(row["upload_bytes_per_client"]), f"{row['seconds']:.0f}"]
            for row in rows
        ]
        columns = ["round", "loss", "test loss", "exact match", "pers. loss", "pers. EM", "upload", "train s"]
    else:
        table_rows = [
            [row["round"], ui.fmt(row["train_loss"]), ui.fmt(row["global_accuracy"]), ui.fmt(row["global_macro_f1"]),
             ui.fmt(row["personalised_accuracy"]), ui.fmt(row["personalised_accuracy_own_mix"]),
             ui.fmt_bytes(row["upload_bytes_per_client"]), f"{row['seconds']:.0f}"]
            for row in rows
        ]
        # pers. acc (own mix): each personalised model on the test split reweighted to its client's label mix.
        columns = ["round", "loss", "global acc", "global F1", "pers. acc", "pers. acc (own mix)", "upload", "train s"]
    if rows and rows[-1]["epsilon"] is not None:
        columns.append("max eps")
        for table_row, row in zip(table_rows, rows):
            table_row.append(ui.fmt(row["epsilon"], 3))
    f = r.federation
    what = f"{f.method} with {r.adapter.kind}" + (f", {f.aggregation} aggregation" if f.aggregation != "mean" else "")
    ui.out.print(ui.table(f"{r.name}: {what}, {f.clients} clients -> {run_dir}", columns, table_rows))
    ui.err.print(f"learning curves: {png}")


# inspect -------------------------------------------------------------------------------------------------


@command(app, "inspect")
def inspect_cmd(
    path: Annotated[Path, typer.Argument(help="A global checkpoint, client update, client state or partition folder.")],
    as_json: JsonOpt = False,
) -> None:
    """Show the manifest of any fedlora folder."""
    from fedlora_cli import checkpoint, partition as partitions, ui

    for name, what in ((checkpoint.GLOBAL_MANIFEST, "global checkpoint"), (checkpoint.UPDATE_MANIFEST, "client update"),
                       (checkpoint.STATE_MANIFEST, "client state"), (partitions.PARTITION_MANIFEST, "partition")):
        if (path / name).is_file():
            data = checkpoint.read_json(path / name, f"{what} manifest")
            break
    else:
        raise FedloraError(f"{path} is not a fedlora folder (no manifest found)")
    if as_json:
        ui.print_json(data)
        return
    rows = [[k, v if not isinstance(v, (dict, list)) else f"{len(v)} entries"] for k, v in data.items() if k != "recipe"]
    ui.out.print(ui.table(f"{what} {path}", ["field", "value"], rows))


# recipes -------------------------------------------------------------------------------------------------


@command(recipes_app, "list")
def recipes_list() -> None:
    """List the shipped recipes."""
    from fedlora_cli import recipes_catalog, ui

    rows = [[name, summary] for name, summary in recipes_catalog.catalog()]
    ui.out.print(ui.table("shipped recipes (use a name wherever a recipe file is expected)", ["name", "what it runs"], rows))


@command(recipes_app, "show")
def recipes_show(name: Annotated[str, typer.Argument(help="Shipped recipe name or recipe file.")]) -> None:
    """Print a recipe's YAML."""
    print(_recipe_path(Path(name)).read_text(), end="")


@command(recipes_app, "copy")
def recipes_copy(
    name: Annotated[str, typer.Argument(help="Shipped recipe name.")],
    dest: Annotated[Path, typer.Argument(help="Where to write the copy.")],
) -> None:
    """Copy a shipped recipe to edit it."""
    from fedlora_cli import ui

    if dest.exists():
        raise FedloraError(f"{dest} already exists")
    dest.write_text(_recipe_path(Path(name)).read_text())
    ui.err.print(f"wrote {dest}")


@command(recipes_app, "validate")
def recipes_validate(
    paths: Annotated[list[Path], typer.Argument(help="Recipe files or shipped names.")],
    sets: SetOpt = None,
) -> None:
    """Check recipes without building anything; exit 1 on the first invalid one."""
    from fedlora_cli import ui

    for path in paths:
        r = _load_recipe(path, sets)
        f = r.federation
        ui.out.print(
            f"[green]ok[/] {path}: {f.method} with {r.adapter.kind}, {f.aggregation} aggregation, "
            f"{f.clients} clients, {f.rounds} rounds"
        )


# privacy ---------------------------------------------------------------------------------------------------


@command(privacy_app, "report")
def privacy_report(
    path: Annotated[Path, typer.Argument(help="A client state folder, a simulate run folder, or a global checkpoint.")],
    as_json: JsonOpt = False,
) -> None:
    """Privacy spent: each round's (noise, sample rate, steps) and the cumulative (epsilon, delta)."""
    from fedlora_cli import privacy_report as report, ui

    entries = report.collect(path)
    if as_json:
        ui.print_json(entries)
        return
    for entry in entries:
        rows = [[i + 1, f"{s:.4f}", f"{q:.5f}", n, f"{eps:.3f}"] for i, ((s, q, n), eps) in enumerate(zip(entry["history"], entry["epsilon_after"]))]
        budget = f", budget {entry['budget']:g}" if entry.get("budget") is not None else ""
        title = f"{entry['who']}: epsilon {entry['epsilon']:.3f} at delta {entry['delta']:g}{budget} ({entry['accountant']})"
        ui.out.print(ui.table(title, ["entry", "noise", "sample rate", "steps", "epsilon after"], rows))


@command(privacy_app, "plan")
def privacy_plan(
    epsilon: Annotated[float, typer.Option("--epsilon", help="Target epsilon over the whole federation.")],
    examples: Annotated[int, typer.Option("--examples", help="The (smallest) client's number of examples.")],
    batch_size: Annotated[int, typer.Option("--batch-size", help="Expected batch size (Poisson sampling).")],
    steps: Annotated[int, typer.Option("--steps", help="Local steps per round.")],
    rounds: Annotated[int, typer.Option("--rounds", help="Rounds the client takes part in.")],
    delta: Annotated[float, typer.Option("--delta", help="Target delta.")] = 1e-5,
    accountant: Annotated[str, typer.Option("--accountant", help="prv or rdp.")] = "prv",
    as_json: JsonOpt = False,
) -> None:
    """The noise multiplier a budget needs for a plan (what init calibrates from a recipe)."""
    from fedlora_cli import privacy, ui

    if epsilon <= 0 or not 0 < delta < 1 or examples < 1 or batch_size < 1 or steps < 1 or rounds < 1:
        raise FedloraError("--epsilon must be > 0, --delta in (0, 1), and the counts at least 1")
    if accountant not in ("prv", "rdp"):
        raise FedloraError("--accountant must be prv or rdp")
    privacy.check_delta(delta, examples, "this client")
    q = min(1.0, batch_size / examples)
    sigma = privacy.calibrate(epsilon, delta, q, steps * rounds, accountant)
    result = {"noise_multiplier": sigma, "sample_rate": q, "total_steps": steps * rounds, "epsilon": epsilon,
              "delta": delta, "accountant": accountant,
              "epsilon_check": privacy.epsilon([(sigma, q, steps * rounds)], delta, accountant)}
    if as_json:
        ui.print_json(result)
        return
    rows = [[k.replace("_", " "), ui.fmt(v)] for k, v in result.items()]
    ui.out.print(ui.table("DP-SGD noise for this plan", ["quantity", "value"], rows))


from fedlora_cli import cli_export  # noqa: E402  (registers on the app defined above)

cli_export.register(app, command)

from fedlora_cli import cli_assets  # noqa: E402  (registers convert-gguf and datasets)

cli_assets.register(app, command)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
