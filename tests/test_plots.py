"""fedlora_cli.plots: the label distribution plot of a partition."""

from __future__ import annotations

from fedlora_cli import recipe as recipes
from fedlora_cli import plots
from fedlora_cli.data import partition


def spec(source, **kw) -> recipes.DataSection:
    raw = {"model": {"base": "m"}, "data": {"source": str(source), "label_column": "sentiment", **kw}}
    return recipes.from_dict(raw).data


def test_plot_writes_png(tmp_path, reviews_csv):
    m = partition.partition(spec(reviews_csv, strategy="dirichlet"), 3, tmp_path / "p").manifest
    plots.label_distribution(m, tmp_path / "labels.png")
    assert (tmp_path / "labels.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
