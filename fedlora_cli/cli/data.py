"""``fedlora partition``: split a dataset across clients and hold out a test split."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from fedlora_cli.cli.app import _load_recipe, app, command
from fedlora_cli.cli.options import JsonOpt, OverwriteOpt

MAX_COUNT_COLUMNS = 10  # label or category values shown as a column each in the partition table (if it fits)

# partition's options that take more than a line to declare.
_ByOpt = Annotated[
    Optional[str],
    typer.Option(help="Category column: the clients for --strategy natural; the skew for dirichlet on causal-lm data."),
]
_SizesOpt = Annotated[
    Optional[str], typer.Option(help="--strategy size: comma-separated relative client sizes, e.g. 0.5,0.3,0.2.")
]
_TaskOpt = Annotated[
    Optional[str], typer.Option(help="sequence-classification (labelled texts) or causal-lm (prompt/response pairs).")
]
_FormatOpt = Annotated[
    Optional[str], typer.Option("--format", help="causal-lm: auto, prompt-response, messages, prompt-completion or alpaca.")
]
_ValidationFractionOpt = Annotated[
    Optional[float], typer.Option(help="Held-out validation fraction (of all rows; 0: none). Default 0.1.")
]


@command(app, "partition")
def partition_cmd(
    source: Annotated[Optional[str], typer.Argument(help="Hub dataset, CSV/JSON/Parquet file, or save_to_disk folder.")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write the shards and manifest to.")] = Path("data"),
    recipe: Annotated[Optional[Path], typer.Option("--recipe", "-r", help="Take data settings from this recipe.")] = None,
    clients: Annotated[Optional[int], typer.Option("--clients", "-n", help="Number of clients.")] = None,
    strategy: Annotated[Optional[str], typer.Option(help="iid, dirichlet, natural or size.")] = None,
    alpha: Annotated[Optional[float], typer.Option(help="Dirichlet concentration (0.5 default, 0.1 severe).")] = None,
    by: _ByOpt = None,
    sizes: _SizesOpt = None,
    task: _TaskOpt = None,
    text_column: Annotated[Optional[str], typer.Option(help="Text column.")] = None,
    label_column: Annotated[Optional[str], typer.Option(help="Label column.")] = None,
    labels: Annotated[Optional[str], typer.Option(help="Comma-separated label values to keep, in id order.")] = None,
    data_format: _FormatOpt = None,
    messages_column: Annotated[Optional[str], typer.Option(help="causal-lm: column of role/content turns.")] = None,
    prompt_column: Annotated[Optional[str], typer.Option(help="causal-lm: prompt column.")] = None,
    response_column: Annotated[Optional[str], typer.Option(help="causal-lm: response column.")] = None,
    answer_column: Annotated[Optional[str], typer.Option(help="causal-lm: final-answer column (kept in the shards).")] = None,
    test_fraction: Annotated[Optional[float], typer.Option(help="Held-out test fraction.")] = None,
    validation_fraction: _ValidationFractionOpt = None,
    seed: Annotated[Optional[int], typer.Option(help="Partition seed.")] = None,
    split: Annotated[Optional[str], typer.Option(help="Split of a Hub dataset or DatasetDict.")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="Write a PNG of the label distribution here.")] = None,
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Split a dataset across clients and hold out test and validation splits: labelled texts, or instruction data
    (prompt/response pairs, TRL's messages or prompt/completion, Alpaca's instruction/input/output). Choose settings
    on the validation split; the test split is then a clean estimate.

    Example: [cyan]fedlora partition reviews.csv --label-column sentiment -n 4 --strategy dirichlet --alpha 0.5 -o data[/]

    Example: [cyan]fedlora partition gsm.jsonl --task causal-lm --prompt-column question -n 3 --strategy size --sizes 0.6,0.3,0.1[/]

    Example: [cyan]fedlora partition chats.jsonl --task causal-lm --format messages -n 20 -o data[/]
    """
    from fedlora_cli.cli import ui
    from fedlora_cli.data import partition as partitions

    overrides = {
        "data.source": source, "data.strategy": strategy, "data.alpha": alpha, "data.by": by, "data.sizes": sizes,
        "data.text_column": text_column, "data.label_column": label_column, "data.labels": labels,
        "data.format": data_format, "data.messages_column": messages_column,
        "data.prompt_column": prompt_column, "data.response_column": response_column,
        "data.answer_column": answer_column, "data.test_fraction": test_fraction, "data.seed": seed, "data.split": split,
        "data.validation_fraction": validation_fraction,
    }
    spec, n, task = _partition_recipe(recipe, overrides, clients, task, sizes)
    ui.check_plot_path(plot)  # before the partition is written, so a bad path does not fail after the work
    with ui.err.status("partitioning"):
        result = partitions.partition(spec, n, out, overwrite=overwrite, task=task)
    _show_partition(result.manifest, out, plot, as_json)


def _partition_recipe(
    recipe: Path | None, overrides: dict, clients: int | None, task: str | None, sizes: str | None
) -> tuple:
    """The data section, the number of clients and the task: from a recipe with the options over it, or from the
    options alone (validated as a recipe all the same)."""
    from fedlora_cli import recipe as recipes

    if recipe is not None:
        r = _load_recipe(recipe, None, {**overrides, "model.task": task})
        return r.data, clients or r.federation.clients, r.model.task
    n = clients or (len(sizes.split(",")) if sizes else 2)
    model = {"base": "-", **({"task": task} if task else {})}
    raw = {"model": model, "federation": {"clients": n}}
    r = recipes.override(raw, overrides)
    return r.data, n, r.model.task


def _show_partition(m: dict, out: Path, plot: Path | None, as_json: bool) -> None:
    """The label distribution's picture (with --plot), then the manifest as JSON, or the table and what was written."""
    from fedlora_cli import plots
    from fedlora_cli.cli import ui

    if plot is not None:
        plots.label_distribution(m, plot)
    if as_json:
        ui.print_json(m)
        return
    ui.out.print(_partition_table(m))
    ui.err.print(f"wrote {out}" + (f" and {plot}" if plot else ""))


def _partition_table(m: dict):
    """Each client's (and the test split's) examples per label, or per-client summaries when there are many."""
    from fedlora_cli.cli import ui
    from fedlora_cli.data.partition import held_out

    names = [str(x) for x in m["label_names"]]
    layout = f", {m['format']} rows" if m.get("format") else ""
    title = f"{m['strategy']} partition of {m['source']}{layout} (seed {m['seed']})"
    if len(names) <= MAX_COUNT_COLUMNS:
        rows = [[c["id"], c["examples"], *c["label_counts"]] for c in m["clients"]]
        rows += [[name, entry["examples"], *entry["label_counts"]] for name, entry in held_out(m)]
        counts = ui.table(title, ["client", "examples", *names], rows)
        if ui.fits(counts):
            return counts

    # Too many categories for a column each (or too wide for the terminal): how many each client holds, and its
    # largest share.
    def summary(entry: dict) -> list:
        counts = entry["label_counts"]
        return [sum(1 for c in counts if c), f"{max(counts) / max(entry['examples'], 1):.2f}"]

    rows = [[c["id"], c["examples"], *summary(c)] for c in m["clients"]]
    rows += [[name, entry["examples"], *summary(entry)] for name, entry in held_out(m)]
    column = m["label_column"]
    return ui.table(title, ["client", "examples", f"{column} values", f"largest {column} share"], rows)
