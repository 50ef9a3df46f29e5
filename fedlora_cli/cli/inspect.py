"""``fedlora inspect``: the manifest of any fedlora folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedlora_cli.cli.app import app, command
from fedlora_cli.cli.options import JsonOpt
from fedlora_cli.errors import FedloraError


@command(app, "inspect")
def inspect_cmd(
    path: Annotated[Path, typer.Argument(help="A global checkpoint, client update, client state or partition folder.")],
    as_json: JsonOpt = False,
) -> None:
    """Show the manifest of any fedlora folder."""
    from fedlora_cli import storage
    from fedlora_cli.cli import ui
    from fedlora_cli.data import partition as partitions

    for name, what in ((storage.GLOBAL_MANIFEST, "global checkpoint"), (storage.UPDATE_MANIFEST, "client update"),
                       (storage.STATE_MANIFEST, "client state"), (partitions.PARTITION_MANIFEST, "partition")):
        if (path / name).is_file():
            data = storage.read_json(path / name, f"{what} manifest")
            break
    else:
        raise FedloraError(f"{path} is not a fedlora folder (no manifest found)")
    if as_json:
        ui.print_json(data)
        return
    rows = [[k, _cell(v)] for k, v in data.items() if k not in ("recipe", "pooling_source")]
    if what == "global checkpoint":
        rows.append(["pooling", _pooling(data)])
    ui.out.print(ui.table(f"{what} {path}", ["field", "value"], rows))


def _pooling(manifest: dict) -> str:
    """What the task head reads, as the global checkpoint's recipe resolved it, and where that came from."""
    model = manifest.get("recipe", {}).get("model", {}) if isinstance(manifest.get("recipe"), dict) else {}
    pooling = model.get("pooling", "default") if isinstance(model, dict) else "default"
    source = manifest.get("pooling_source") or "written before pooling was recorded"
    return f"{pooling} ({source})"


def _cell(value) -> str:
    """A manifest value as a table cell: collections by their size, sha256 digests by their first 16 digits (the
    whole of each is in --json)."""
    if isinstance(value, (dict, list)):
        return f"{len(value)} entries"
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:16] + "…"
    return str(value)
