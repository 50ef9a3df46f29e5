"""``fedlora simulate``: a whole federation on this machine, with a table of rounds and learning curves."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from fedlora_cli.cli.app import _load_recipe, app, command
from fedlora_cli.cli.options import DeviceOpt, JsonOpt, SetOpt
from fedlora_cli.errors import FedloraError


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
    keep_state_rounds: Annotated[
        Optional[int],
        typer.Option(help="Keep only each client's newest N state rounds (the run folder then grows by the global "
                          "checkpoint and the client updates per round); default: keep all."),
    ] = None,
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Run a whole federation on this machine; re-running resumes after the last completed step.

    Every client trains on one device (--device, or the recipe's training.device); aggregation runs on the CPU.
    """
    from fedlora_cli import recipe as recipes, storage
    from fedlora_cli.cli import plots, ui
    from fedlora_cli.federation import simulate as sim

    r = _load_recipe(recipe, sets, {"federation.rounds": rounds, "federation.clients": clients,
                                    "federation.method": method, "training.device": device})
    run_dir = out or Path("runs") / r.name
    ui.check_plot_path(plot)  # before the federation runs, so a bad path does not fail after the work
    if keep_state_rounds is not None and keep_state_rounds < 1:
        raise FedloraError(f"--keep-state-rounds must be at least 1; got {keep_state_rounds}")
    rows = sim.simulate(r, run_dir, ui.SimulationReporter(quiet=as_json), overwrite=overwrite,
                        keep_state_rounds=keep_state_rounds)
    png = plot or storage.RunLayout(run_dir).curves
    score = "exact match" if r.model.task == recipes.TASK_CAUSAL_LM else "test accuracy"
    plots.round_curves(rows, png, f"{r.name}: {r.federation.method}, {r.federation.clients} clients", score)
    if as_json:
        ui.print_json({"run": str(run_dir), "rounds": rows, "plot": str(png)})
        return
    ui.out.print(_rounds_table(r, rows, run_dir))
    ui.err.print(f"learning curves: {png}")


_CAUSAL_COLUMNS = (("test loss", "global_loss"), ("exact match", "global_accuracy"),
                   ("pers. loss", "personalised_loss"), ("pers. EM", "personalised_accuracy"))
_CLASSIFICATION_COLUMNS = (("global acc", "global_accuracy"), ("global F1", "global_macro_f1"),
                           ("pers. acc", "personalised_accuracy"), ("pers. acc (own mix)", "personalised_accuracy_own_mix"))


def _rounds_table(r, rows: list[dict], run_dir: Path):
    """One row per round: the task's scores, upload per client, training seconds (and epsilon under DP)."""
    from fedlora_cli import recipe as recipes
    from fedlora_cli.cli import ui

    # Each column: its heading and the round row's key. A causal LM shows test loss (per response token) and
    # exact match instead of accuracy and macro-F1; "own mix" is each personalised model on the test split
    # reweighted to its client's label mix.
    scores = _CAUSAL_COLUMNS if r.model.task == recipes.TASK_CAUSAL_LM else _CLASSIFICATION_COLUMNS
    columns = ["round", "loss", *(heading for heading, _ in scores), "upload", "train s"]
    table_rows = [
        [row["round"], ui.fmt(row["train_loss"]), *(ui.fmt(row[key]) for _, key in scores),
         ui.fmt_bytes(row["upload_bytes_per_client"]), f"{row['seconds']:.0f}"]
        for row in rows
    ]
    if rows and rows[-1]["epsilon"] is not None:
        columns.append("max eps")
        for table_row, row in zip(table_rows, rows):
            table_row.append(ui.fmt(row["epsilon"], 3))
    f = r.federation
    what = f"{f.method} with {r.adapter.kind}" + (f", {f.aggregation} aggregation" if f.aggregation != "mean" else "")
    return ui.table(f"{r.name}: {what}, {f.clients} clients -> {run_dir}", columns, table_rows)
