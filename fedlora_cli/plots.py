"""Pictures a person would rather look at than read: label distributions and learning curves (matplotlib, PNG).

Both write to a temporary file beside the target and rename it into place, as every fedlora output does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedlora_cli import storage


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, png: Path) -> None:
    plt = _pyplot()
    try:
        with storage.atomic_file(Path(png)) as tmp:
            fig.savefig(tmp, dpi=120)
    finally:
        plt.close(fig)


def label_distribution(manifest: dict[str, Any], png: Path) -> None:
    """Stacked bars from a partition manifest: examples per label for every client, and the held-out splits."""
    import numpy as np

    plt = _pyplot()
    from fedlora_cli.data.partition import held_out

    splits = held_out(manifest)
    names = [c["id"] for c in manifest["clients"]] + [name for name, _ in splits]
    label_names = manifest["label_names"] or []
    fig, ax = plt.subplots(figsize=(max(4.0, 0.8 * len(names) + 2), 3.6))
    if label_names:
        counts = np.asarray([c["label_counts"] for c in manifest["clients"]] + [e["label_counts"] for _, e in splits])
        bottom = np.zeros(len(names))
        for j, label in enumerate(label_names):
            ax.bar(names, counts[:, j], bottom=bottom, label=str(label))
            bottom += counts[:, j]
    else:
        ax.bar(names, [c["examples"] for c in manifest["clients"]] + [e["examples"] for _, e in splits])
    title = manifest["strategy"] + (f" (alpha={manifest['alpha']})" if manifest.get("alpha") else "")
    what = manifest["label_column"] or "size"
    ax.set_title(f"Distribution of {what} per client: {title}, seed {manifest['seed']}")
    ax.set_ylabel("examples")
    if label_names and len(label_names) <= 12:
        ax.legend(title=manifest["label_column"], fontsize="small")
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    fig.tight_layout()
    _save(fig, png)


# The per-round figures of fedlora simulate (its rows), as (row key, legend label).
_LOSSES = (("train_loss", "train (clients)"), ("global_loss", "test, global"), ("personalised_loss", "test, personalised"))
_SCORES = (("global_accuracy", "global"), ("personalised_accuracy", "personalised"),
           ("personalised_accuracy_own_mix", "personalised, own label mix"),
           ("sites_accuracy", "global, at the sites (their test data)"))


def run_curves(rows: list[dict[str, Any]], png: Path, recipe: Any) -> None:
    """The learning curves of a federation's run folder (RUN/metrics/rounds.png), drawn the same by ``simulate``
    and by the Flower server app."""
    from fedlora_cli.recipe import TASK_CAUSAL_LM

    score = "exact match" if recipe.model.task == TASK_CAUSAL_LM else "test accuracy"
    f = recipe.federation
    round_curves(rows, png, f"{recipe.name}: {f.method}, {f.clients} clients", score)


def round_curves(rows: list[dict[str, Any]], png: Path, title: str, score_name: str = "accuracy") -> None:
    """Learning curves of a simulation: losses and test scores by round, and the epsilon spent under DP."""
    plt = _pyplot()
    rounds = [r["round"] for r in rows]
    has_eps = any(r.get("epsilon") is not None for r in rows)
    fig, axes = plt.subplots(1, 3 if has_eps else 2, figsize=(12 if has_eps else 8.5, 3.4))
    for ax, series, ylabel in ((axes[0], _LOSSES, "loss"), (axes[1], _SCORES, score_name)):
        for key, label in series:
            values = [r.get(key) for r in rows]
            if any(v is not None for v in values):
                ax.plot(rounds, [float("nan") if v is None else v for v in values], marker="o", label=label)
        ax.set_xlabel("round")
        ax.set_ylabel(ylabel)
        ax.set_xticks(rounds)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
    if has_eps:
        axes[2].plot(rounds, [r.get("epsilon") for r in rows], marker="o", color="tab:red")
        axes[2].set_xlabel("round")
        axes[2].set_ylabel("epsilon spent (largest client)")
        axes[2].set_xticks(rounds)
        axes[2].grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, png)
