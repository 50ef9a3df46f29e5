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
    from fedlora_cli import recipe as recipes
    from fedlora_cli.data import partition

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
    from fedlora_cli.federation import simulate

    def run(recipe, name: str = "run"):
        layout = simulate.RunLayout(tmp_path / name)
        simulate.simulate(recipe, layout.root, QuietReporter())
        return layout

    return run


# --------------------------------------------------------------------------------------------------------
# causal-lm: a tiny Llama with a byte-level BPE tokenizer and a chat template, and tiny math problems

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_math(n: int, seed: int) -> pd.DataFrame:
    """Arithmetic word problems with worked answers ending in '#### N', and the operation as a category."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        a, b = int(rng.integers(2, 60)), int(rng.integers(2, 30))
        op = ["add", "sub", "mul"][int(rng.integers(3))]
        value, sign = {"add": (a + b, "+"), "sub": (a - b, "-"), "mul": (a * b, "*")}[op]
        rows.append({
            "question": f"Sam has {a} apples and the rule is {op} {b}. How many apples?",
            "response": f"{a} {sign} {b} = {value}\n#### {value}",
            "answer": str(value),
            "category": op,
        })
    return pd.DataFrame(rows)


@pytest.fixture(scope="session")
def math_jsonl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("math") / "math.jsonl"
    make_math(150, seed=3).to_json(path, orient="records", lines=True)
    return path


@pytest.fixture(scope="session")
def tiny_causal_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 32-wide Llama with random weights and a 300-token byte-level BPE tokenizer trained here."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny-llama")
    specials = ["<pad>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [f"{q} {r}" for q, r in zip(make_math(300, seed=11)["question"], make_math(300, seed=11)["response"])]
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(corpus + ["user assistant system\n"], trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<|im_start|>", eos_token="<|im_end|>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(4321)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def causal_recipe_dict(model_dir: Path, data: Path, method: str = "fedavg", **training) -> dict:
    return {
        "name": f"tiny-causal-{method}",
        "model": {"base": str(model_dir), "task": "causal-lm"},
        "data": {
            "source": str(data), "prompt_column": "question", "response_column": "response",
            "answer_column": "answer", "chat_template": True, "strategy": "dirichlet", "by": "category",
            "alpha": 1.0, "test_fraction": 0.2, "seed": 0, "max_length": 64,
        },
        "adapter": {"r": 4, "alpha": 8, "dropout": 0.0},
        "federation": {"method": method, "rounds": 2, "clients": 3},
        "training": {"optimizer": "adamw", "lr": 0.01, "local_steps": 3, "batch_size": 8, "eval_batch_size": 8,
                     "seed": 0, **training},
        "evaluation": {"answer": "number", "max_new_tokens": 12, "generate_examples": 10},
    }


@pytest.fixture
def make_causal_recipe(tiny_causal_dir: Path, math_jsonl: Path):
    from fedlora_cli import recipe as recipes

    def make(method: str = "fedavg", sections: dict | None = None, **training):
        raw = causal_recipe_dict(tiny_causal_dir, math_jsonl, method, **training)
        for name, values in (sections or {}).items():
            raw[name] = {**(raw.get(name) or {}), **values}
        return recipes.from_dict(raw)

    return make
