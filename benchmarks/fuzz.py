"""The fuzz properties of tests/fuzz with a larger budget: how many inputs each reader was given, how many it accepted,
how many it refused in one line, and how many broke the property (another exception, a hang, a stray write).

    python benchmarks/fuzz.py [--examples 2000] [--seconds 25] [--only NAME[,NAME]] [--json FILE]

Each property runs until ``--examples`` inputs or ``--seconds`` have passed, whichever comes first. A failure is
counted and the run goes on (the first failing input of each property is printed, shortened), so one bug does not
hide the others; the CI tests (tests/fuzz) stop at the first and shrink it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class _OutOfTime(Exception):
    """The property's time is up: stop generating inputs."""


def run(name: str, strategy: Any, check: Any, examples: int, seconds: float) -> dict[str, Any]:
    """Feed ``check`` up to ``examples`` inputs from ``strategy`` for at most ``seconds``; count the outcomes."""
    from hypothesis import HealthCheck, Phase, given, settings

    counts = {"property": name, "tried": 0, "accepted": 0, "refused": 0, "failures": 0, "first failure": ""}
    stop_at = time.monotonic() + seconds

    @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def property_(example: Any) -> None:
        if time.monotonic() > stop_at:
            raise _OutOfTime
        counts["tried"] += 1
        with tempfile.TemporaryDirectory() as tmp:
            try:
                counts[check(example, Path(tmp))] += 1
            except Exception as exc:  # noqa: BLE001 - a broken property is counted, and the run goes on
                counts["failures"] += 1
                if not counts["first failure"]:
                    counts["first failure"] = f"{exc.__class__.__name__}: {str(exc)[:160]} <- {example!r:.160}"

    try:
        property_()
    except _OutOfTime:
        pass
    counts["seconds"] = round(seconds - max(stop_at - time.monotonic(), 0), 1)
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=25.0)
    parser.add_argument("--only", default="", help="comma-separated property names (default: all)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    from rich.console import Console
    from rich.table import Table

    from tests.fuzz.properties import PROPERTIES

    chosen = {name: p for name, p in PROPERTIES().items() if not args.only or name in args.only.split(",")}
    rows = [run(name, strategy, check, args.examples, args.seconds) for name, (strategy, check) in chosen.items()]
    table = Table(title="fuzzing what other parties write")
    for column in ("property", "tried", "accepted", "refused", "failures", "seconds"):
        table.add_column(column, justify="left" if column == "property" else "right")
    for row in rows:
        table.add_row(*(str(row[c]) for c in ("property", "tried", "accepted", "refused", "failures", "seconds")))
    console = Console()
    console.print(table)
    for row in rows:
        if row["failures"]:
            console.print(f"[red]{row['property']}[/red]: {row['first failure']}", markup=True, highlight=False)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 1 if any(row["failures"] for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
