"""The recipes shipped in the top-level ``recipes/`` folder, addressable by name."""

from __future__ import annotations

from pathlib import Path

from fedlora_cli.errors import FedloraError

_PACKAGE = Path(__file__).resolve().parent.parent  # fedlora_cli/
# An installed wheel carries the recipes inside the package; a source checkout has them at the top level.
RECIPES_DIR = next((d for d in (_PACKAGE / "recipes", _PACKAGE.parent / "recipes") if d.is_dir()), _PACKAGE / "recipes")


def names() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def find(name: str) -> Path:
    path = RECIPES_DIR / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(names()) or "none"
        raise FedloraError(f"recipe not found: '{name}' is neither a file nor a shipped recipe (shipped: {known})")
    return path


def summary(path: Path) -> str:
    """The recipe's first comment line."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def catalog() -> list[tuple[str, str]]:
    return [(name, summary(find(name))) for name in names()]
