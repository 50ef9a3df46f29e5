"""How fedlora writes values in prose, tables and model cards (one formatter for every place a number is shown)."""

from __future__ import annotations

from typing import Any


def fmt(value: Any, digits: int = 4) -> str:
    """A float with ``digits`` decimals, '-' for None, anything else as ``str``."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def fmt_bytes(n: int | None, compact: bool = False) -> str:
    """A byte count in B, KB, MB or GB (powers of 1000), '-' for None.

    ``compact`` is for table cells: no space before the unit (a terminal table never breaks the cell there) and
    no decimal from 100 on, so it takes at most six characters ("99.9KB", "227KB").
    """
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            break
        n /= 1000
    if compact:
        return f"{n:.0f}{unit}" if unit == "B" or abs(round(n, 1)) >= 100 else f"{n:.1f}{unit}"
    return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"


def listed(values: Any, limit: int = 10) -> str:
    """Values joined by commas, the first ``limit`` of them and how many more (an error line stays one line)."""
    values = [str(v) for v in values]
    if len(values) <= limit:
        return ", ".join(values)
    return f"{', '.join(values[:limit])}, ... ({len(values) - limit} more)"
