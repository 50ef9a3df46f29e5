"""fedlora_cli's import graph has no cycle, counting every import statement: module level, inside functions and
under ``if TYPE_CHECKING:`` alike (a cycle that is harmless at run time today still ties two rooms together)."""

from __future__ import annotations

import ast
from pathlib import Path

import fedlora_cli

PACKAGE = Path(fedlora_cli.__file__).resolve().parent
ROOT = PACKAGE.name  # fedlora_cli


def module_names(package: Path) -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name, not its __init__)."""
    names = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The module a ``from ... import`` names, relative imports resolved against ``module``."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def imports_of(module: str, path: Path, modules: set[str]) -> set[str]:
    """The package's modules that ``module`` imports anywhere in its file. ``from x import y`` is module x.y when
    y is a submodule, else module x."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(node, module, path.name == "__init__.py")
            for alias in node.names:
                found.add(f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source)
    return {name for name in found if name in modules and name != module}


def import_graph(package: Path) -> dict[str, set[str]]:
    names = module_names(package)
    return {module: imports_of(module, path, set(names)) for module, path in names.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as the list of its modules (the first repeated at the end), or None."""
    state: dict[str, str] = {}  # 'open' while on the depth-first path, 'done' once every successor is checked
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for successor in sorted(graph[node]):
            if state.get(successor) == "open":
                return [*path[path.index(successor):], successor]
            if successor not in state:
                cycle = visit(successor)
                if cycle:
                    return cycle
        path.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_cycle_finder_finds_a_cycle_and_names_it():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_graph_counts_function_local_type_checking_and_relative_imports(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from pkg.sub.leaf import x\n")
    (package / "sub" / "leaf.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import top\n"
    )
    (package / "top.py").write_text(
        "def f():\n    from .sub import leaf\n    from . import sub\n    import pkg.other\n"
    )
    (package / "other.py").write_text("from .sub.leaf import x\n")
    graph = import_graph(package)
    assert graph == {
        "pkg": set(), "pkg.sub": {"pkg.sub.leaf"}, "pkg.sub.leaf": {"pkg.top"},
        "pkg.top": {"pkg.sub.leaf", "pkg.sub", "pkg.other"}, "pkg.other": {"pkg.sub.leaf"},
    }
    assert find_cycle(graph) == ["pkg.other", "pkg.sub.leaf", "pkg.top", "pkg.other"]


def test_fedlora_cli_has_no_import_cycle():
    graph = import_graph(PACKAGE)
    assert len(graph) > 50 and "fedlora_cli.recipe.schema" in graph
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def layer(module: str) -> str:
    """Which layer a module is in: the CLI (fedlora_cli.cli, and ``python -m fedlora_cli`` that runs it), the optional
    Flower layer, or the core (the rest)."""
    parts = module.split(".")
    if len(parts) > 1 and parts[1] == "__main__":
        return "cli"
    return parts[1] if len(parts) > 1 and parts[1] in ("cli", "flower") else "core"


def test_the_layers_import_downwards_only_cli_then_flower_then_core():
    # A module-level cycle is not the only tie: fedlora_cli.cli and fedlora_cli.flower once imported each other
    # through different modules (the server app drew its curves with the CLI's plots).
    allowed = {"cli": {"cli", "flower", "core"}, "flower": {"flower", "core"}, "core": {"core"}}
    graph = import_graph(PACKAGE)
    upward = sorted(f"{m} -> {i}" for m, imports in graph.items() for i in imports if layer(i) not in allowed[layer(m)])
    assert upward == []
