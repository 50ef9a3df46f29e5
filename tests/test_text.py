"""fedlora_cli.text: how values are written in prose and in table cells."""

from __future__ import annotations

import pytest

from fedlora_cli.text import fmt, fmt_bytes


@pytest.mark.parametrize(
    "n, prose, cell",
    [
        (None, "-", "-"),
        (850, "850 B", "850B"),
        (2_980, "3.0 KB", "3.0KB"),
        (99_949, "99.9 KB", "99.9KB"),
        (99_950, "100.0 KB", "100KB"),  # rounds to 100: no decimal, still six characters at most
        (226_944, "226.9 KB", "227KB"),  # the quickstart's upload per client
        (12_345_678, "12.3 MB", "12.3MB"),
        (5_000_000_000, "5.0 GB", "5.0GB"),
    ],
)
def test_fmt_bytes_in_prose_and_in_a_cell(n, prose, cell):
    assert fmt_bytes(n) == prose
    assert fmt_bytes(n, compact=True) == cell
    assert " " not in cell and len(cell) <= 6


def test_fmt():
    assert (fmt(None), fmt(0.5), fmt(0.123456, 2), fmt(3)) == ("-", "0.5000", "0.12", "3")
