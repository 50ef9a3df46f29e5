"""Option types shared by the CLI's commands (one definition each, so help texts agree)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout (for scripts).")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace the output folder if it exists.")]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", help="Override a recipe value, e.g. --set training.lr=0.01 (repeatable)."),
]
BaseModelOpt = Annotated[
    Optional[str],
    typer.Option("--base-model", help="Where this site keeps the base model, if not where the recipe says."),
]
