"""Reading a client's shard (or the test split) and turning it into token batches, for each task.

Shards are Parquet files written by ``fedlora partition``. For ``sequence-classification`` they hold a text
column and an integer label column (:class:`Examples`); for ``causal-lm`` a prompt column, a response column
and optionally an answer column (:class:`PromptResponses`). :func:`read_examples` reads either, as the
recipe's task says; :func:`encode` turns rows of either into a batch.

Batches are padded to their longest sequence (dynamic padding), truncated at ``data.max_length``. A causal-LM
batch is the prompt tokens followed by the response tokens and the EOS token, padded on the right; its
``labels`` are the input ids on response tokens and -100 on prompt and padding tokens, so only the response
carries a loss. The prompt and the response are tokenised separately (the boundary between them is exact),
the prompt through the tokenizer's chat template when ``data.chat_template`` is on. When the two do not fit
in ``max_length`` the response loses its end; a prompt that leaves no room for even one response token loses
its beginning (the question at its end is what the response follows).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedlora_cli.errors import FedloraError, first_line

if TYPE_CHECKING:
    import numpy as np
    import torch

    from fedlora_cli.recipe.schema import DataSection


@dataclass
class Examples:
    texts: list[str]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.texts)


@dataclass
class PromptResponses:
    """Causal-LM examples: the model learns to continue each prompt with its response."""

    prompts: list[str]
    responses: list[str]
    answers: list[str] | None = None  # the checkable final answers (answer_column), if the data has them
    chat_template: bool = False

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def texts(self) -> list[str]:
        return self.prompts


IGNORE_INDEX = -100  # the label of a token without a loss (PyTorch's cross-entropy ignore_index)


def _read_frame(path: Path, columns: list[str]) -> Any:
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise FedloraError(f"data shard not found: {path}")
    try:
        frame = pd.read_parquet(path)
    except (OSError, ValueError) as exc:
        raise FedloraError(f"data shard {path} is not a readable Parquet file ({first_line(exc)})") from None
    for column in columns:
        if column not in frame.columns:
            raise FedloraError(f"data shard {path} has no column '{column}'")
    if len(frame) == 0:
        raise FedloraError(f"data shard {path} is empty")
    return frame


def read_examples(path: Path, data: DataSection, task: str, num_labels: int | None) -> Examples | PromptResponses:
    """A shard of the recipe's task: labelled texts, or prompt/response pairs."""
    from fedlora_cli.recipe.schema import TASK_CAUSAL_LM

    if task == TASK_CAUSAL_LM:
        return read_prompt_responses(
            path, data.prompt_column, data.response_column, data.answer_column, data.chat_template
        )
    if num_labels is None:
        raise FedloraError("the number of labels is unknown for a sequence-classification shard")
    return read_shard(path, data.text_column, data.label_column, num_labels)


def read_prompt_responses(
    path: Path, prompt_column: str, response_column: str, answer_column: str | None = None, chat_template: bool = False
) -> PromptResponses:
    columns = [prompt_column, response_column] + ([answer_column] if answer_column else [])
    frame = _read_frame(path, columns)
    for column in columns:
        if frame[column].isna().any():
            raise FedloraError(f"data shard {path}: column '{column}' has empty values")
    answers = [str(a) for a in frame[answer_column].tolist()] if answer_column else None
    return PromptResponses(
        [str(t) for t in frame[prompt_column].tolist()], [str(t) for t in frame[response_column].tolist()],
        answers, chat_template,
    )


def read_shard(path: Path, text_column: str, label_column: str, num_labels: int) -> Examples:
    import numpy as np

    frame = _read_frame(path, [text_column, label_column])
    labels = frame[label_column].to_numpy()
    if labels.dtype.kind not in "iu":
        raise FedloraError(f"data shard {path}: column '{label_column}' must hold integer label ids")
    if labels.min() < 0 or labels.max() >= num_labels:
        raise FedloraError(f"data shard {path}: label ids must lie in [0, {num_labels - 1}]")
    return Examples([str(t) for t in frame[text_column].tolist()], labels.astype(np.int64))


def encode(
    tokenizer: Any, examples: Examples | PromptResponses, rows: Any, max_length: int
) -> dict[str, torch.Tensor]:
    """A padded batch of ``rows``: input_ids, attention_mask and labels (class ids, or per-token targets)."""
    import torch

    if isinstance(examples, PromptResponses):
        return encode_causal(tokenizer, examples, rows, max_length)
    batch = tokenizer(
        [examples.texts[i] for i in rows], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )
    batch["labels"] = torch.as_tensor(examples.labels[rows], dtype=torch.long)
    return dict(batch)


def prompt_ids(tokenizer: Any, prompt: str, chat_template: bool) -> list[int]:
    """The token ids of a prompt as the model sees it before its response (or before generating)."""
    if chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise FedloraError("data.chat_template is on but the base model's tokenizer has no chat template")
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
        # The template writes the special tokens (BOS, turn markers) itself.
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(prompt)["input_ids"])


def response_ids(tokenizer: Any, response: str) -> list[int]:
    """The token ids of a response, ended by EOS so that the model learns where to stop."""
    ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is None:
        raise FedloraError("the base model's tokenizer has no EOS token: a causal-lm response could not end")
    return ids + [tokenizer.eos_token_id]


def fit(prompt: list[int], response: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Prompt and response cut to ``max_length`` tokens together: the response loses its end; a prompt that
    would leave no room for one response token loses its beginning."""
    prompt = prompt[-(max_length - 1):] if len(prompt) > max_length - 1 else prompt
    return prompt, response[: max_length - len(prompt)]


def encode_causal(tokenizer: Any, examples: PromptResponses, rows: Any, max_length: int) -> dict[str, torch.Tensor]:
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pairs = [
        fit(prompt_ids(tokenizer, examples.prompts[i], examples.chat_template),
            response_ids(tokenizer, examples.responses[i]), max_length)
        for i in rows
    ]
    width = max(len(p) + len(r) for p, r in pairs)
    input_ids = torch.full((len(pairs), width), pad, dtype=torch.long)
    attention = torch.zeros((len(pairs), width), dtype=torch.long)
    labels = torch.full((len(pairs), width), IGNORE_INDEX, dtype=torch.long)
    for k, (p, r) in enumerate(pairs):
        n = len(p) + len(r)
        input_ids[k, :n] = torch.as_tensor(p + r)
        attention[k, :n] = 1
        labels[k, len(p):n] = torch.as_tensor(r)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def encode_prompts(tokenizer: Any, examples: PromptResponses, rows: Any, max_length: int) -> dict[str, torch.Tensor]:
    """Prompts alone, padded on the left (generation continues every row from its last column)."""
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompts = [prompt_ids(tokenizer, examples.prompts[i], examples.chat_template)[-(max_length - 1):] for i in rows]
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for k, p in enumerate(prompts):
        input_ids[k, width - len(p):] = torch.as_tensor(p)
        attention[k, width - len(p):] = 1
    return {"input_ids": input_ids, "attention_mask": attention}


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
    """Local steps of one round: ``local_steps``, or enough batches for ``local_epochs`` passes over n examples.

    The one place this is computed: DP-SGD calibrates its noise and checks the budget with the same count that
    training then runs. The quotient is rounded before the ceiling so that float noise (1.1 x 50 / 5 is
    11.000000000000002) does not add a step.
    """
    import math

    if local_steps is not None:
        return local_steps
    assert local_epochs is not None
    return max(1, math.ceil(round(local_epochs * n / min(batch_size, n), 9)))
