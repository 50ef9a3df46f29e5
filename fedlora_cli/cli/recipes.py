"""``fedlora recipes``: list, show, copy and validate recipes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedlora_cli.cli.app import _load_recipe, _recipe_path, command, recipes_app
from fedlora_cli.cli.options import SetOpt
from fedlora_cli.errors import FedloraError


@command(recipes_app, "list")
def recipes_list() -> None:
    """List the shipped recipes."""
    from fedlora_cli.cli import ui
    from fedlora_cli.recipe import catalog as recipes_catalog

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
    from fedlora_cli.cli import ui

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
    from fedlora_cli.cli import ui

    for path in paths:
        r = _load_recipe(path, sets)
        f = r.federation
        ui.out.print(
            f"[green]ok[/] {path}: {f.method} with {r.adapter.kind}, {f.aggregation} aggregation, "
            f"{f.clients} clients, {f.rounds} rounds"
        )
