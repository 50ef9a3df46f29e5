"""Shared fixtures: a tiny BERT and a tiny Llama built from a config, tiny datasets, recipes over them, and finished
tiny federations simulated once per session (cached_federation) or copied for a test to write into (federation_copy).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fedlora_cli.data.examples import PromptResponses  # noqa: E402  (light: no torch, no Hub client)

if TYPE_CHECKING:
    import torch

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


def exact_gaussian_epsilon(releases: list[tuple[float, int]], delta: float) -> float:
    """An independent reference for Gaussian releases without sampling, each (noise multiplier, count): they
    compose into one Gaussian with mu^2 = sum count / sigma^2, whose privacy loss is N(mu^2 / 2, mu^2); delta(eps)
    = E[(1 - e^(eps - L))+] is integrated numerically here and inverted by bisection."""
    mu = float(np.sqrt(sum(n / s**2 for s, n in releases)))
    loss = np.linspace(mu**2 / 2 - 40 * mu, mu**2 / 2 + 40 * mu, 400_001)
    density = np.exp(-((loss - mu**2 / 2) ** 2) / (2 * mu**2)) / (mu * np.sqrt(2 * np.pi))

    def delta_at(eps: float) -> float:
        return float(np.trapezoid(np.clip(1 - np.exp(np.minimum(eps - loss, 50)), 0, None) * density, loss))

    low, high = 0.0, 200.0
    for _ in range(80):
        middle = (low + high) / 2
        low, high = (middle, high) if delta_at(middle) > delta else (low, middle)
    return high


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


def private_recipe(model_dir, data, method="ffa", head="shared", **privacy_section):
    """conftest's recipe under DP-SGD (plain SGD at lr 0.5, per-example clip 1, delta 1e-3), as a raw dict."""
    raw = recipe_dict(model_dir, data, method, head, optimizer="sgd", lr=0.5)
    raw["privacy"] = {"max_grad_norm": 1.0, "delta": 1e-3, **privacy_section}
    return raw


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


@dataclass
class FakeContribution:
    """One client update as an aggregation strategy sees it (:class:`fedlora_cli.aggregation.Contribution`), made
    by hand: its tensors while it is streamed, and ``get`` to read one back, each read recorded in ``reads``."""

    client_id: str
    weight: float
    stored: dict[str, torch.Tensor]
    tensors: dict[str, torch.Tensor] | None = None
    reads: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.tensors = dict(self.stored)

    def get(self, name: str) -> torch.Tensor:
        self.reads.append(name)
        return self.stored[name].clone()


class QuietReporter:
    def stage(self, text):
        pass

    def warn(self, text):
        pass

    def training(self, round_, client_id):
        return None

    def done_training(self):
        pass

    def round_done(self, row):
        pass


@pytest.fixture
def run_federation(tmp_path: Path):
    """Simulate a tiny federation afresh, in this test's tmp_path; returns its RunLayout.

    For a test that watches the simulation itself (a spy on training, an interrupted run). A test that only needs a
    finished run takes :func:`cached_federation`, and one that writes into the run folder :func:`federation_copy`.
    """
    from fedlora_cli.federation import simulate

    def run(recipe, name: str = "run"):
        layout = simulate.RunLayout(tmp_path / name)
        simulate.simulate(recipe, layout.root, QuietReporter())
        return layout

    return run


@pytest.fixture(scope="session")
def cached_federation(tmp_path_factory: pytest.TempPathFactory):
    """Finished tiny federations, each simulated once per test session: one per recipe (keyed by its digest).

    Shared by every test that asks for the same recipe, so a test may only READ the run folder. A test that writes
    into it (a DP-FedAvg aggregation writes its ledger beside the global checkpoints, for one) takes a
    :func:`federation_copy` instead.
    """
    from fedlora_cli.federation import simulate

    done: dict[str, simulate.RunLayout] = {}
    snapshots: dict[str, dict[str, tuple[int, int]]] = {}

    def run(recipe) -> simulate.RunLayout:
        key = recipe.digest()
        if key not in done:
            layout = simulate.RunLayout(tmp_path_factory.mktemp(f"cached-{recipe.name}") / "run")
            simulate.simulate(recipe, layout.root, QuietReporter())
            done[key] = layout
            snapshots[key] = _files_of(layout.root)
        return done[key]

    yield run
    # The guard that makes sharing safe: no test wrote into a cached run.
    changed = {key: sorted(set(_files_of(done[key].root).items()) ^ set(files.items())) for key, files in snapshots.items()}
    changed = {done[key].root: diff for key, diff in changed.items() if diff}
    assert not changed, f"a test wrote into a cached federation (take a federation_copy): {changed}"


def _files_of(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def federation_copy(cached_federation, tmp_path: Path):
    """A private copy (in this test's tmp_path) of the cached finished federation of a recipe: free to write into."""
    import shutil

    from fedlora_cli.federation import simulate

    def copy(recipe, name: str = "run") -> simulate.RunLayout:
        layout = simulate.RunLayout(tmp_path / name)
        shutil.copytree(cached_federation(recipe).root, layout.root)
        return layout

    return copy


@pytest.fixture
def federation_of(cached_federation, tiny_model_dir: Path, reviews_csv: Path):
    """The cached finished federation of conftest's recipe with ``method``, ``head``, training keys and whole
    sections changed (e.g. ``privacy={...}``); tests only read it."""
    from fedlora_cli import recipe as recipes

    def run(method: str, head: str = "shared", training: dict | None = None, **sections: dict):
        raw = recipe_dict(tiny_model_dir, reviews_csv, method, head, **(training or {}))
        for name, values in sections.items():
            raw[name] = {**raw.get(name, {}), **values}
        return cached_federation(recipes.from_dict(raw))

    return run


@pytest.fixture
def kind_recipe(tiny_model_dir: Path, reviews_csv: Path):
    """conftest's recipe with another adapter kind (and adapter keys)."""
    from fedlora_cli import recipe as recipes

    def make(kind: str, method: str = "fedavg", head: str = "shared", **adapter):
        raw = recipe_dict(tiny_model_dir, reviews_csv, method, head)
        raw["adapter"].update({"kind": kind, **adapter})
        return recipes.from_dict(raw)

    return make


@pytest.fixture
def strategy_recipe(tiny_model_dir: Path, reviews_csv: Path):
    """conftest's recipe with an adapter kind, client ranks and federation keys (an aggregation strategy)."""
    from fedlora_cli import recipe as recipes

    def make(method: str = "fedavg", kind: str = "lora", client_ranks=None, **federation_keys):
        raw = recipe_dict(tiny_model_dir, reviews_csv, method)
        raw["adapter"].update({"kind": kind, "client_ranks": client_ranks})
        raw["federation"].update(federation_keys)
        return recipes.from_dict(raw)

    return make


# --------------------------------------------------------------------------------------------------------
# causal-lm: a tiny Llama with a byte-level BPE tokenizer and a chat template, and tiny math problems

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# Two prompt-response pairs with final answers, chat-templated: what the causal-lm unit tests encode and score.
PAIRS = PromptResponses(
    prompts=["Sam has 3 apples and the rule is add 4. How many apples?", "What is 12 * 2?"],
    responses=["3 + 4 = 7\n#### 7", "12 * 2 = 24\n#### 24"],
    answers=["7", "24"],
    chat_template=True,
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


def write_chats(path: Path, n: int = 60, seed: int = 5) -> Path:
    """:func:`make_math`'s problems as two-exchange conversations (the question and the worked answer, then 'The
    number alone?' and the number) in a ``messages`` column, beside ``answer`` and ``category``; JSON Lines."""
    rows = [{"messages": [{"role": "user", "content": r.question}, {"role": "assistant", "content": r.response},
                          {"role": "user", "content": "The number alone?"}, {"role": "assistant", "content": r.answer}],
             "answer": r.answer, "category": r.category} for r in make_math(n, seed).itertuples()]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


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


# Federations of many sites: a tiny recipe with federation keys replaced, a run, a folder's digest


@pytest.fixture
def scaled(tiny_model_dir, reviews_csv):
    """A tiny federation recipe with federation (and training) keys replaced."""

    from fedlora_cli import recipe as recipes

    def make(method: str = "fedavg", training: dict | None = None, **federation_keys):
        raw = recipe_dict(tiny_model_dir, reviews_csv, method, **(training or {}))
        raw["federation"].update(federation_keys)
        return recipes.from_dict(raw)

    return make


def run(recipe, path: Path, **options):
    """Simulate ``recipe`` into ``path``; its RunLayout."""
    from fedlora_cli import storage
    from fedlora_cli.federation import simulate

    simulate.simulate(recipe, path, QuietReporter(), **options)
    return storage.RunLayout(path)


def folder_digest(folder: Path) -> str:
    """One digest over every file's relative path and bytes."""
    import hashlib

    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(folder).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


def legacy_tensor_digest(tensor) -> str:
    """A tensor's digest as fedlora wrote it before xxh128 (bare sha256 hex), for fixtures written the old way;
    tests/storage/test_files.py pins it to a digest the old fedlora wrote. A numpy array (the numpy round's) is
    hashed as the torch tensor of its bytes, as the old fedlora would have held it."""
    import hashlib

    import torch

    if not isinstance(tensor, torch.Tensor):
        tensor = torch.from_numpy(tensor)
    t = tensor.detach().contiguous().cpu()
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()
