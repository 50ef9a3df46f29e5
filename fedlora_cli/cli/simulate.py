"""``fedlora simulate``: a whole federation on this machine, with a table of rounds and learning curves."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from fedlora_cli.cli.app import _load_recipe, app, command
from fedlora_cli.cli.options import JsonOpt, SetOpt


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
    from fedlora_cli import recipe as recipes, storage
    from fedlora_cli.cli import plots, ui
    from fedlora_cli.federation import simulate as sim

    r = _load_recipe(recipe, sets, {"federation.rounds": rounds, "federation.clients": clients, "federation.method": method})
    run_dir = out or Path("runs") / r.name
    ui.check_plot_path(plot)  # before the federation runs, so a bad path does not fail after the work
    rows = sim.simulate(r, run_dir, ui.SimulationReporter(quiet=as_json), overwrite=overwrite)
    png = plot or storage.RunLayout(run_dir).curves
    score = "exact match" if r.model.task == recipes.TASK_CAUSAL_LM else "test accuracy"
    plots.round_curves(rows, png, f"{r.name}: {r.federation.method}, {r.federation.clients} clients", score)
    if as_json:
        ui.print_json({"run": str(run_dir), "rounds": rows, "plot": str(png)})
        return
    ui.out.print(_rounds_table(r, rows, run_dir))
    ui.err.print(f"learning curves: {png}")


def _rounds_table(r, rows: list[dict], run_dir: Path):
    """One row per round: the task's scores, upload per client, training seconds (and epsilon under DP)."""
    from fedlora_cli import recipe as recipes
    from fedlora_cli.cli import ui

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
    return ui.table(f"{r.name}: {what}, {f.clients} clients -> {run_dir}", columns, table_rows)
