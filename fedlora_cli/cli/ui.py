"""Everything fedlora shows a person: rich tables and progress bars (stderr for progress, stdout for results)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from fedlora_cli.errors import FedloraError
from fedlora_cli.text import fmt, fmt_bytes

__all__ = [
    "SimulationReporter", "check_plot_path", "common_prefix", "err", "fits", "fmt", "fmt_bytes", "out", "print_json",
    "step_progress", "table",
]

out = Console(soft_wrap=True)
err = Console(stderr=True)


def print_json(data: Any) -> None:
    """Machine output: plain JSON on stdout, no colour, no wrapping."""
    print(json.dumps(data, indent=2, default=str))


def check_plot_path(plot: Path | None) -> None:
    """Refuse a --plot path that cannot be written, before the work whose results it would draw."""
    if plot is None:
        return
    try:
        plot.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FedloraError(f"cannot write the plot to {plot}: {exc.strerror}") from None


def common_prefix(names: Sequence[str]) -> tuple[str, list[str]]:
    """The dotted prefix all names share, and the names without it (long PEFT module paths, shortened)."""
    if not names:
        return "", []
    parts = [n.split(".") for n in names]
    k = 0
    while all(len(p) > k + 1 and p[k] == parts[0][k] for p in parts):
        k += 1
    return ".".join(parts[0][:k]), [".".join(p[k:]) for p in parts]


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> Table:
    """A table under its title; the first column left-aligned, the rest right.

    Tables are laid out to fit an 80-column terminal: cells hold no spaces a terminal would break them at (units
    abbreviated, see :func:`fmt_bytes`) and long headings are written on two lines ("train\\nloss").
    """
    t = Table(title=title, title_justify="left")
    for i, column in enumerate(columns):
        t.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        t.add_row(*[str(cell) for cell in row])
    return t


def fits(t: Table, width: int | None = None) -> bool:
    """Whether a table fits ``width`` columns (default: the terminal's) with no cell wrapped."""
    return Console(width=10_000).measure(t).maximum <= (width or out.width)


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=False,
    )


@contextmanager
def step_progress(description: str) -> Iterator[Callable[..., None]]:
    """A progress bar fed by ``callback(done, total, loss)``; it appears with the first step, not before."""
    bar: Progress | None = None
    task = None

    def callback(done: int, total: int, loss: float = float("nan")) -> None:
        nonlocal bar, task
        if bar is None:
            bar = _progress()
            bar.start()
            task = bar.add_task(description, total=total, info="")
        bar.update(task, completed=done, total=total, info=f"loss {loss:.4f}" if loss == loss else "")

    try:
        yield callback
    finally:
        if bar is not None:
            bar.stop()


class SimulationReporter:
    """Renders a running simulation: a line per stage, a bar per client round, a table row per round."""

    def __init__(self, quiet: bool = False, global_is_model: bool = True) -> None:
        self.quiet = quiet
        # FedSA's B or a local head stays at home: the global checkpoint alone is no model, so its scores (the
        # base model's, with the shared head if any) are left out of the line.
        self.global_is_model = global_is_model
        self._bar: Progress | None = None

    def stage(self, text: str) -> None:
        if not self.quiet:
            err.print(f"[cyan]>[/] {text}")

    def warn(self, text: str) -> None:
        err.print(f"[yellow]warning:[/] {text}")

    def training(self, round_: int, client_id: str) -> Callable[[int, int, float], None] | None:
        if self.quiet:
            return None
        self._bar = _progress()
        self._bar.start()
        task = self._bar.add_task(f"round {round_} {client_id}", total=None, info="")
        bar = self._bar

        def callback(done: int, total: int, loss: float) -> None:
            bar.update(task, completed=done, total=total, info=f"loss {loss:.4f}")

        return callback

    def done_training(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def round_done(self, row: dict[str, Any]) -> None:
        if self.quiet:
            return
        parts = [f"train loss {fmt(row['train_loss'])}"]
        if row.get("skipped"):
            parts.insert(0, "skipped (its sample asked fewer than min_clients; the global carried forward)")
        if row["personalised_accuracy"] is not None:
            parts.insert(0, f"personalised accuracy {row['personalised_accuracy']:.4f}")
        if self.global_is_model:
            parts.append(f"global test loss {row['global_loss']:.4f}")
            if row["global_accuracy"] is not None:
                parts.append(f"global accuracy {row['global_accuracy']:.4f}")
        if row.get("epsilon") is not None:
            parts.append(f"epsilon spent {row['epsilon']:.3f}")
        if row.get("clamped_values"):
            parts.append(f"{row['clamped_values']} value(s) clamped by secure aggregation")
        err.print(f"[green]round {row['round']}:[/] " + ", ".join(parts))
