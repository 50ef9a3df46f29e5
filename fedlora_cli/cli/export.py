"""``fedlora export``: a global or personalised model as a PEFT adapter or merged model, with a model card.

Like every command it imports the core (torch, transformers, peft) only when it runs, so ``fedlora --help``
stays light.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Callable, Optional

import typer

from fedlora_cli.cli.app import app, command
from fedlora_cli.cli.options import BaseModelOpt, DeviceOpt, JsonOpt, OverwriteOpt

if TYPE_CHECKING:
    from fedlora_cli.export import ExportResult, HubTarget


# What export writes, and from which round and client.
_RoundOpt = Annotated[Optional[str], typer.Option(
    "--round", help="Which round of the run: 'best' (the best validation score of the model exported: the "
    "global, or with --client-id/--state that client's personalised one), 'last', or a number.")]
_StateOpt = Annotated[Optional[Path], typer.Option("--state", help="Export personalised: this client's state folder.")]
_ClientIdOpt = Annotated[
    Optional[str], typer.Option("--client-id", help="Client id of --state (checked); in a simulate run, enough on its own.")
]
_MergeOpt = Annotated[
    bool, typer.Option("--merge", help="Fold the adapter into the base weights: a plain transformers model.")
]
_DtypeOpt = Annotated[
    str, typer.Option("--dtype", help="Saved dtype: float32, float16 or bfloat16 (merging is done in float32).")
]
_EvalDataOpt = Annotated[Optional[Path], typer.Option(
    "--eval-data",
    help="Evaluate on this data for the model card: a partition folder, a shard, or any data evaluate --data takes.",
)]

# The Hub options of export (with --push-to-hub only).
_PushToHubOpt = Annotated[
    Optional[str], typer.Option("--push-to-hub", help="Upload the export to this Hub model repo (user/name).")
]
_PrivateOpt = Annotated[
    bool, typer.Option("--private", help="Create the Hub repo private (an existing repo keeps its visibility).")
]
_RevisionOpt = Annotated[Optional[str], typer.Option("--revision", help="Push to this branch (created if missing).")]
_CommitMessageOpt = Annotated[Optional[str], typer.Option("--commit-message", help="Hub commit message.")]
_TokenOpt = Annotated[
    Optional[str], typer.Option("--token", help="Hub token; default: HF_TOKEN or the token saved by 'hf auth login'.")
]


@command(app, "export")
def export_cmd(
    global_checkpoint: Annotated[Path, typer.Argument(
        help="Global checkpoint folder to export; with --round, the run folder (or any of its global checkpoints).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write the export to.")],
    round_: _RoundOpt = None,
    state: _StateOpt = None,
    client_id: _ClientIdOpt = None,
    merge: _MergeOpt = False,
    dtype: _DtypeOpt = "float32",
    eval_data: _EvalDataOpt = None,
    base_model: BaseModelOpt = None,
    device: DeviceOpt = None,
    push_to_hub: _PushToHubOpt = None,
    private: _PrivateOpt = False,
    revision: _RevisionOpt = None,
    commit_message: _CommitMessageOpt = None,
    token: _TokenOpt = None,
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Export the global model, or one client's personalised model, for use without fedlora.

    Default: a PEFT adapter folder (classifier head included) with the tokenizer and a model card; --merge
    writes a plain transformers model instead; --push-to-hub uploads the folder to the Hugging Face Hub. The
    base model is loaded in float32 and unquantised, whatever precision or 4-bit base the sites trained on.

    Example: [cyan]fedlora export runs/fedsa/global/round-003 --client-id client-0 --merge -o export/client-0[/]

    Example: [cyan]fedlora export runs/quickstart --round best -o export/quickstart[/]
    """
    from fedlora_cli import export as exports

    hub = _hub_target(push_to_hub, private, revision, commit_message, token)
    if round_ is not None:
        global_checkpoint = _chosen(global_checkpoint, round_, client_id, state)

    def run(progress: Callable[[int, int], None] | None) -> ExportResult:
        return exports.export(
            global_checkpoint, out, state_dir=state, client_id=client_id, merge=merge, dtype=dtype,
            eval_data=eval_data, base_override=base_model, hub=hub, overwrite=overwrite, progress=progress,
            device=device,
        )

    _print_result(_with_feedback(run, eval_data is not None, global_checkpoint), as_json)


def _chosen(path: Path, which: str, client_id: str | None, state: Path | None) -> Path:
    """The global checkpoint --round names (said on stderr with the validation score that chose it)."""
    from fedlora_cli.cli import ui
    from fedlora_cli.federation.selection import choose_round

    chosen = choose_round(path, which, client_id, state)
    why = f": validation {chosen.metric} {chosen.score:.4f}, the best of the run" if chosen.score is not None else ""
    ui.err.print(f"round {chosen.round} ({chosen.path}){why}", highlight=False)
    return chosen.path


def _hub_target(
    repo_id: str | None, private: bool, revision: str | None, commit_message: str | None, token: str | None
) -> HubTarget | None:
    """Where --push-to-hub uploads, or None; the Hub options are refused without it."""
    from fedlora_cli import export as exports
    from fedlora_cli.errors import FedloraError

    if repo_id is None and (private or revision or commit_message or token):
        raise FedloraError("--private, --revision, --commit-message and --token go with --push-to-hub")
    return exports.HubTarget(repo_id=repo_id, private=private, revision=revision, commit_message=commit_message,
                             token=token) if repo_id is not None else None


def _with_feedback(
    run: Callable[[Callable[[int, int], None] | None], ExportResult], evaluating: bool, source: Path
) -> ExportResult:
    """Run the export under a progress bar when it evaluates (the slow part), else under a spinner."""
    from fedlora_cli.cli import ui

    if evaluating:
        with ui.step_progress("evaluating for the model card") as bar:
            return run(lambda done, total: bar(done, total))
    with ui.err.status(f"exporting {source}"):
        return run(None)


def _print_result(result: ExportResult, as_json: bool) -> None:
    """The result as JSON, or the notes on stderr, then what was exported and its files as two tables on stdout."""
    from fedlora_cli.cli import ui

    if as_json:
        ui.print_json(result.to_dict())
        return
    for note in result.notes:
        ui.err.print(f"[yellow]note:[/] {note}", highlight=False)
    ui.out.print(ui.table(f"export -> {result.path}", ["field", "value"], _summary_rows(result)))
    files = [[name, ui.fmt_bytes(size)] for name, size in result.files]
    files.append(["total", ui.fmt_bytes(sum(size for _, size in result.files))])
    ui.out.print(ui.table("files", ["file", "size"], files))


def _summary_rows(result: ExportResult) -> list[list[str]]:
    from fedlora_cli.cli import ui

    who = f"personalised for {result.client_id}" if result.client_id else "global"
    rows = [
        ["model", f"{who}, {result.method} round {result.round}"],
        ["kind", f"{result.kind} ({result.dtype})"],
        ["base model", result.base_model],
    ]
    for r in result.evaluation:
        if "perplexity" in r:  # causal-lm
            rows += [[f"{r['model']} loss per token", ui.fmt(r["loss"])],
                     [f"{r['model']} exact match", ui.fmt(r["exact_match"])]]
        else:
            rows.append([f"{r['model']} accuracy", ui.fmt(r["accuracy"])])
    if result.hub_url:
        rows.append(["pushed to", result.hub_url])
    return rows
