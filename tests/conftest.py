"""Shared fixtures: a tiny BERT built from a config, a tiny word-level sentiment dataset, recipes over them."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

POSITIVE = ["good", "great", "fine", "lovely", "superb", "fun", "warm", "smart"]
NEGATIVE = ["bad", "awful", "dull", "boring", "weak", "flat", "cold", "silly"]
FILLER = ["the", "movie", "film", "plot", "was", "a", "and", "story", "acting", "really", "very", "it"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 32-wide BERT with a word-level vocabulary: random weights, saved like a Hub model."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    path = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *POSITIVE, *NEGATIVE, *FILLER]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(path / "vocab.txt"))
    tokenizer.save_pretrained(path)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64,
    )
    torch.manual_seed(1234)
    BertForSequenceClassification(config).save_pretrained(path)
    return path


def make_reviews(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        label = int(rng.integers(2))
        words = list(rng.choice(FILLER, size=4)) + list(rng.choice(POSITIVE if label else NEGATIVE, size=2))
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "sentiment": "pos" if label else "neg", "site": f"s{int(rng.integers(3))}"})
    return pd.DataFrame(rows)


@pytest.fixture(scope="session")
def reviews_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "reviews.csv"
    make_reviews(400, seed=7).to_csv(path, index=False)
    return path


def recipe_dict(model_dir: Path, data: Path, method: str = "fedavg", head: str = "shared", **training) -> dict:
    return {
        "name": f"tiny-{method}",
        "model": {"base": str(model_dir)},
        "data": {
            "source": str(data), "text_column": "text", "label_column": "sentiment", "labels": ["neg", "pos"],
            "strategy": "dirichlet", "alpha": 1.0, "test_fraction": 0.2, "seed": 0, "max_length": 16,
        },
        "adapter": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["query", "value"]},
        "federation": {"method": method, "head": head, "rounds": 2, "clients": 3},
        "training": {"optimizer": "adamw", "lr": 0.01, "local_steps": 3, "batch_size": 8, "seed": 0, **training},
    }


@pytest.fixture
def make_recipe(tiny_model_dir: Path, reviews_csv: Path):
    from fedlora_cli import recipe as recipes

    def make(method: str = "fedavg", head: str = "shared", **training):
        return recipes.from_dict(recipe_dict(tiny_model_dir, reviews_csv, method, head, **training))

    return make


@pytest.fixture(scope="session")
def partition_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, reviews_csv: Path) -> Path:
    from fedlora_cli import partition, recipe as recipes

    r = recipes.from_dict(recipe_dict(tiny_model_dir, reviews_csv))
    out = tmp_path_factory.mktemp("partition") / "data"
    partition.partition(r.data, r.federation.clients, out)
    return out


class QuietReporter:
    def stage(self, text):
        pass

    def training(self, round_, client_id):
        return None

    def done_training(self):
        pass

    def round_done(self, row):
        pass


@pytest.fixture
def run_federation(tmp_path: Path):
    """Simulate a tiny federation; returns its RunLayout."""
    from fedlora_cli import simulate

    def run(recipe, name: str = "run"):
        layout = simulate.RunLayout(tmp_path / name)
        simulate.simulate(recipe, layout.root, QuietReporter())
        return layout

    return run
