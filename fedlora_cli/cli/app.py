"""The ``fedlora`` command: the Typer app, its callback, and the decorator every command is registered with.

Commands import the core inside their bodies, so ``fedlora --help`` never loads torch or transformers.
A :class:`~fedlora_cli.errors.FedloraError` becomes one red line on stderr and exit code 1; set
``FEDLORA_DEBUG=1`` to see the traceback instead.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Annotated, Any, Callable

import typer

from fedlora_cli import __version__
from fedlora_cli.errors import FedloraError, first_line

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
    from rich.markup import escape

    from fedlora_cli.cli import ui

    # Escaped: a message may hold square brackets that are not markup (pip install 'fedlora[mlflow]').
    ui.err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


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
                _fail(f"{exc.__class__.__name__}: {first_line(exc) if str(exc).strip() else ''} "
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


def _load_recipe(path: Path, sets: list[str] | None, extra: dict[str, Any] | None = None,
                 labels: dict[str, str] | None = None):
    """The recipe with the --set overrides, then the command's own options (``extra``: recipe key -> value, None
    keeping the recipe's) over it; ``labels`` names each option key as the user typed it (``--rounds``)."""
    from fedlora_cli import recipe as recipes

    options = {k: v for k, v in (extra or {}).items() if v is not None}
    overrides = {**dict(recipes.parse_override(s) for s in sets or []), **options}
    return recipes.load(_recipe_path(path), overrides, {k: v for k, v in (labels or {}).items() if k in options})


def _recipe_path(path: Path) -> Path:
    """A recipe file, or the name of a shipped recipe (``quickstart`` for recipes/quickstart.yaml)."""
    from fedlora_cli.recipe.catalog import find

    return path if path.exists() or path.suffix in (".yaml", ".yml") else find(str(path))


def main() -> None:
    app()
