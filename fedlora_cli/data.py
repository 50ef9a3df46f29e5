"""Reading a client's shard (or the test split) and turning it into token batches.

Shards are Parquet files written by ``fedlora partition``: a text column and an integer label column.
Batches are padded to their longest sequence (dynamic padding), truncated at ``data.max_length``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedlora_cli.errors import FedloraError

if TYPE_CHECKING:
    import numpy as np
    import torch


@dataclass
class Examples:
    texts: list[str]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.texts)


def read_shard(path: Path, text_column: str, label_column: str, num_labels: int) -> Examples:
    import numpy as np
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise FedloraError(f"data shard not found: {path}")
    try:
        frame = pd.read_parquet(path)
    except (OSError, ValueError) as exc:
        raise FedloraError(f"data shard {path} is not a readable Parquet file ({str(exc).splitlines()[0]})") from None
    for column in (text_column, label_column):
        if column not in frame.columns:
            raise FedloraError(f"data shard {path} has no column '{column}'")
    if len(frame) == 0:
        raise FedloraError(f"data shard {path} is empty")
    labels = frame[label_column].to_numpy()
    if labels.dtype.kind not in "iu":
        raise FedloraError(f"data shard {path}: column '{label_column}' must hold integer label ids")
    if labels.min() < 0 or labels.max() >= num_labels:
        raise FedloraError(f"data shard {path}: label ids must lie in [0, {num_labels - 1}]")
    return Examples([str(t) for t in frame[text_column].tolist()], labels.astype(np.int64))


def encode(tokenizer: Any, examples: Examples, rows: Any, max_length: int) -> dict[str, torch.Tensor]:
    import torch

    batch = tokenizer(
        [examples.texts[i] for i in rows], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )
    batch["labels"] = torch.as_tensor(examples.labels[rows], dtype=torch.long)
    return dict(batch)


def batch_schedule(n: int, batch_size: int, steps: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``steps`` batches drawn from seeded shuffled passes over ``n`` examples (a pass restarts when used up)."""

    batches: list[np.ndarray] = []
    order = rng.permutation(n)
    cursor = 0
    size = min(batch_size, n)
    while len(batches) < steps:
        if cursor + size > n:
            order, cursor = rng.permutation(n), 0
        batches.append(order[cursor : cursor + size])
        cursor += size
    return batches


def steps_for(n: int, batch_size: int, local_steps: int | None, local_epochs: float | None) -> int:
    import math

    if local_steps is not None:
        return local_steps
    assert local_epochs is not None
    return max(1, math.ceil(local_epochs * n / min(batch_size, n)))
