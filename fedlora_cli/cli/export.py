"""``fedlora export``: a global or personalised model as a PEFT adapter or merged model, with a model card.

Like every command it imports the core (torch, transformers, peft) only when it runs, so ``fedlora --help``
stays light.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from fedlora_cli.cli.app import app, command
from fedlora_cli.cli.options import BaseModelOpt, JsonOpt, OverwriteOpt


@command(app, "export")
def export_cmd(
    global_checkpoint: Annotated[Path, typer.Argument(help="Global checkpoint folder to export.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write the export to.")],
    state: Annotated[
        Optional[Path], typer.Option("--state", help="Export personalised: this client's state folder.")
    ] = None,
    client_id: Annotated[
        Optional[str],
        typer.Option("--client-id", help="Client id of --state (checked); in a simulate run, enough on its own."),
    ] = None,
    merge: Annotated[
        bool, typer.Option("--merge", help="Fold the adapter into the base weights: a plain transformers model.")
    ] = False,
    dtype: Annotated[
        str, typer.Option("--dtype", help="Saved dtype: float32, float16 or bfloat16 (merging is done in float32).")
    ] = "float32",
    eval_data: Annotated[
        Optional[Path],
        typer.Option("--eval-data", help="Evaluate on this test Parquet file or partition folder for the model card."),
    ] = None,
    base_model: BaseModelOpt = None,
    push_to_hub: Annotated[
        Optional[str], typer.Option("--push-to-hub", help="Upload the export to this Hub model repo (user/name).")
    ] = None,
    private: Annotated[
        bool, typer.Option("--private", help="Create the Hub repo private (an existing repo keeps its visibility).")
    ] = False,
    revision: Annotated[
        Optional[str], typer.Option("--revision", help="Push to this branch (created if missing).")
    ] = None,
    commit_message: Annotated[Optional[str], typer.Option("--commit-message", help="Hub commit message.")] = None,
    token: Annotated[
        Optional[str],
        typer.Option("--token", help="Hub token; default: HF_TOKEN or the token saved by 'hf auth login'."),
    ] = None,
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Export the global model, or one client's personalised model, for use without fedlora.

    Default: a PEFT adapter folder (classifier head included) with the tokenizer and a model card; --merge
    writes a plain transformers model instead; --push-to-hub uploads the folder to the Hugging Face Hub.

    Example: [cyan]fedlora export runs/fedsa/global/round-003 --client-id client-0 --merge -o export/client-0[/]
    """
    from fedlora_cli import export as exports
    from fedlora_cli.cli import ui
    from fedlora_cli.errors import FedloraError

    if push_to_hub is None and (private or revision or commit_message or token):
        raise FedloraError("--private, --revision, --commit-message and --token go with --push-to-hub")
    hub = None
    if push_to_hub is not None:
        hub = exports.HubTarget(push_to_hub, private, revision, commit_message, token)

    def run(progress: Callable[[int, int], None] | None) -> Any:
        return exports.export(
            global_checkpoint, out, state_dir=state, client_id=client_id, merge=merge, dtype=dtype,
            eval_data=eval_data, base_override=base_model, hub=hub, overwrite=overwrite, progress=progress,
        )

    if eval_data is not None:
        with ui.step_progress("evaluating for the model card") as bar:
            result = run(lambda done, total: bar(done, total))
    else:
        with ui.err.status(f"exporting {global_checkpoint}"):
            result = run(None)
    if as_json:
        ui.print_json(result.to_dict())
        return
    for note in result.notes:
        ui.err.print(f"[yellow]note:[/] {note}", highlight=False)
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
    ui.out.print(ui.table(f"export -> {result.path}", ["field", "value"], rows))
    files = [[name, ui.fmt_bytes(size)] for name, size in result.files]
    files.append(["total", ui.fmt_bytes(sum(size for _, size in result.files))])
    ui.out.print(ui.table("files", ["file", "size"], files))
