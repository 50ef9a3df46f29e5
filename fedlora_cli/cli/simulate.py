"""``fedlora simulate``: a whole federation on this machine, with a table of rounds and learning curves."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from fedlora_cli.cli.app import _load_recipe, app, command
from fedlora_cli.cli.options import DeviceOpt, JsonOpt, ReportToOpt, SetOpt, ThreadsOpt, TrackingDirOpt, site_settings
from fedlora_cli.errors import FedloraError
from fedlora_cli.recipe.site_settings import FLAGS as SITE_FLAGS

# How simulate's options name the recipe keys they override, in messages.
_OPTION_FLAGS = {"federation.rounds": "--rounds", "federation.clients": "--clients", "federation.method": "--method"}


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
    threads: ThreadsOpt = None,
    report_to: ReportToOpt = None,
    tracking_dir: TrackingDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Run a whole federation on this machine; re-running resumes after the last completed step.

    Every client trains on one device (--device, or the recipe's training.device); aggregation runs on the CPU.
    With --report-to, each round's scores, upload and epsilon, and each client's training loss per step (not
    under DP-SGD: that stays with the client), go to the trackers; a resumed run continues the same tracker run.
    """
    from fedlora_cli import adapters, plots, storage, tracking
    from fedlora_cli.cli import ui
    from fedlora_cli.federation import simulate as sim

    options = {"federation.rounds": rounds, "federation.clients": clients, "federation.method": method,
               **site_settings(device=device, threads=threads)}
    r = _load_recipe(recipe, sets, options, {**_OPTION_FLAGS, **SITE_FLAGS})
    run_dir = out or Path("runs") / r.name
    ui.check_plot_path(plot)  # before the federation runs, so a bad path does not fail after the work
    if keep_state_rounds is not None and keep_state_rounds < 1:
        raise FedloraError(f"--keep-state-rounds must be at least 1; got {keep_state_rounds}")
    trackers = tracking.resolve(report_to, r)  # an unknown or missing tracker fails before the work
    plan = adapters.plan(r.federation.method, r.federation.head, r.adapter.kind)
    reporter = ui.SimulationReporter(quiet=as_json, global_is_model=plan.global_is_model)
    with tracking.open_run(trackers, run_dir, r.name, tracking_dir) as tracked:
        reporter = tracking.SimulationTracker(reporter, tracked, private=r.privacy is not None)
        rows = sim.simulate(r, run_dir, reporter, overwrite=overwrite, keep_state_rounds=keep_state_rounds)
    png = plot or storage.RunLayout(run_dir).curves
    plots.run_curves(rows, png, r)
    with storage.atomic_file(storage.RunLayout(run_dir).rounds) as tmp:
        storage.write_json(tmp, rows)
    if as_json:
        ui.print_json({"run": str(run_dir), "rounds": rows, "plot": str(png)})
        return
    ui.out.print(_rounds_table(r, plan, rows, run_dir))
    note = _partial_global_note(r, plan, rows)
    if note is not None:
        ui.out.print(note, soft_wrap=False, highlight=False)
    ui.err.print(f"learning curves: {png}")
    if trackers:
        ui.err.print(f"tracking ({', '.join(trackers)}): {tracked.directory}")


# Score columns: (heading, the round row's key), for the global model and for the personalised ones. Headings are
# two lines so that a full table (DP-SGD and heterogeneous ranks: nine columns) fits 80 columns. A causal LM shows
# test loss (per response token) and exact match instead of accuracy and macro-F1; "own mix" is each personalised
# model on the test split reweighted to its client's label mix.
_CAUSAL_SCORES = {
    "global": (("test\nloss", "global_loss"), ("exact\nmatch", "global_accuracy"),
               ("val\nEM", "validation_global_accuracy")),
    "personalised": (("pers.\nloss", "personalised_loss"), ("pers.\nEM", "personalised_accuracy"),
                     ("pers.\nval EM", "validation_personalised_accuracy")),
}
# The validation split's score ("val": settings and rounds are chosen on it), then the test split's. Macro-F1 is
# left to --json and RUN/metrics, so that the fullest table still fits 80 columns.
_CLASSIFICATION_SCORES = {
    "global": (("val\nacc", "validation_global_accuracy"), ("test\nacc", "global_accuracy")),
    "personalised": (("pers.\nval", "validation_personalised_accuracy"), ("pers.\nacc", "personalised_accuracy"),
                     ("own\nmix", "personalised_accuracy_own_mix")),
}


def _rounds_table(r, plan, rows: list[dict], run_dir: Path):
    """One row per round: the scores that mean something for the method, upload per client, training seconds
    (and epsilon under DP).

    When the global checkpoint alone is no model (FedSA's B or a local head stays at home) the personalised
    scores are the federation's result: they lead, the global's are left out (they stay in --json and
    RUN/metrics), and :func:`_partial_global_note` says why under the table.
    """
    from fedlora_cli import recipe as recipes
    from fedlora_cli.cli import ui

    causal = r.model.task == recipes.TASK_CAUSAL_LM
    scores = _CAUSAL_SCORES if causal else _CLASSIFICATION_SCORES
    groups = ("global", "personalised") if plan.global_is_model else ("personalised",)
    # A column nobody filled carries nothing; the validation score is shown for the leading group (the model the
    # federation delivers), so that the fullest table still fits 80 columns (the others' are in --json).
    shown = [(h, key) for i, group in enumerate(groups) for h, key in scores[group]
             if any(row.get(key) is not None for row in rows) and (i == 0 or not key.startswith("validation_"))]
    columns = ["round", "train\nloss", *(h for h, _ in shown), "upload", "train\ns"]
    table_rows = [
        [row["round"], ui.fmt(row["train_loss"]), *(ui.fmt(row[key]) for _, key in shown),
         ui.fmt_bytes(row["upload_bytes_per_client"], compact=True), "-" if row["seconds"] is None else f"{row['seconds']:.0f}"]
        for row in rows
    ]
    if rows and rows[-1]["epsilon"] is not None:
        columns.append("max\neps")
        for table_row, row in zip(table_rows, rows):
            table_row.append(ui.fmt(row["epsilon"], 2))
    f = r.federation
    what = f"{plan.method.label} ({plan.kind.label})" + (f", {f.aggregation}" if f.aggregation != "mean" else "")
    title = f"{r.name}: {what}, {f.clients} clients -> {run_dir}"
    return ui.table(title, columns, table_rows)


def _partial_global_note(r, plan, rows: list[dict]) -> str | None:
    """Why the round table leaves the global checkpoint's scores out, with the figure a reader would miss."""
    from fedlora_cli import recipe as recipes

    why = plan.why_global_is_partial()
    if why is None:
        return None
    score = "exact match" if r.model.task == recipes.TASK_CAUSAL_LM else "accuracy"
    values = [row["global_accuracy"] for row in rows if row["global_accuracy"] is not None]
    if not values:
        figure = ""
    elif max(values) == min(values):
        figure = f" ({score} {values[0]:.4f} in every round)"
    else:
        figure = f" ({score} {min(values):.4f} to {max(values):.4f})"
    return (f"The global checkpoint{figure} is no model on its own: {why}. The personalised scores (the global "
            "plus each client's own state) are the federation's.")
