"""Reading a site's examples (a client's shard, the test split, or the site's own data) and turning them into
token batches, for each task.

Shards are Parquet files written by ``fedlora partition``. For ``sequence-classification`` they hold a text
column and an integer label column (:class:`Examples`); for ``causal-lm`` the columns of the data's layout
(``data.format``, :mod:`fedlora_cli.data.formats`: prompt/response pairs, TRL's messages or prompt/completion,
Alpaca) and optionally an answer column, read as :class:`~fedlora_cli.data.causal.CausalExamples`
(:class:`PromptResponses`, or multi-turn :class:`~fedlora_cli.data.conversations.Conversations`).
:func:`read_examples` reads either task's, as the recipe says; :func:`encode` turns rows of either into a batch.

A site may instead give its own data, from any source partition reads (:mod:`fedlora_cli.data.sources`: a
CSV/TSV/JSON/JSONL/Parquet file, optionally compressed, a save_to_disk folder, a Hub dataset), with the
recipe's column names. Its labels may be the federation's label names or their integer ids
(:func:`label_ids`). A file without a needed column, without rows, with an empty value, or with a label the
federation does not know is refused in one line.

Batches are padded to their longest sequence (dynamic padding), truncated at ``data.max_length``. A causal-LM
batch is the prompt tokens followed by the response tokens and the EOS token, padded on the right; its
``labels`` are the input ids on response tokens and -100 on prompt and padding tokens, so only the response
carries a loss. The prompt and the response are tokenised separately (the boundary between them is exact),
the prompt through the tokenizer's chat template when ``data.chat_template`` is on. When the two do not fit
in ``max_length`` the response loses its end; a prompt that leaves no room for even one response token loses
its beginning (the question at its end is what the response follows). A conversation is encoded the same way
from its pieces (:func:`fit_pieces`): labels on its assistant turns only, cut like a prompt before its first
assistant turn and like a response from there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

# prompt_ids and response_ids are read from here too: this module is where a site's examples come from.
from fedlora_cli.data.causal import CausalExamples, PromptResponses, prompt_ids, response_ids  # noqa: F401
from fedlora_cli.errors import FedloraError
from fedlora_cli.text import listed

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


IGNORE_INDEX = -100  # the label of a token without a loss (PyTorch's cross-entropy ignore_index)


def read_examples(
    source: Path | str, data: DataSection, task: str, num_labels: int | None, label_names: list[str] | None = None,
    split: str | None = None,
) -> Examples | CausalExamples:
    """A site's examples of the recipe's task, from a shard or any source ``fedlora partition`` reads: labelled
    texts, or prompt/response pairs, in the recipe's columns. ``split`` (of a Hub dataset or a DatasetDict folder)
    defaults to the recipe's ``data.split``; ``label_names`` are the federation's, in id order (see
    :func:`label_ids`)."""
    from fedlora_cli.recipe.schema import TASK_CAUSAL_LM

    split = data.split if split is None else split
    if task == TASK_CAUSAL_LM:
        return read_causal(source, data, split)
    if num_labels is None:
        raise FedloraError("the number of labels is unknown for a sequence-classification shard")
    return read_shard(source, data.text_column, data.label_column, num_labels, label_names, split)


def read_prompt_responses(
    source: Path | str, prompt_column: str, response_column: str, answer_column: str | None = None,
    chat_template: bool = False, split: str = "train",
) -> PromptResponses:
    columns = [prompt_column, response_column] + ([answer_column] if answer_column else [])
    frame = _read_frame(source, columns, split)
    answers = [str(a) for a in frame[answer_column].tolist()] if answer_column else None
    return PromptResponses(
        [str(t) for t in frame[prompt_column].tolist()], [str(t) for t in frame[response_column].tolist()],
        answers, chat_template,
    )


def read_causal(source: Path | str, data: DataSection, split: str) -> CausalExamples:
    """A site's causal-LM examples in the layout ``data.format`` names, or the one its columns show (``auto``):
    see :mod:`fedlora_cli.data.formats`."""
    from fedlora_cli.data import formats
    from fedlora_cli.data.sources import read_source

    frame = read_source(str(source), split)
    layout = formats.resolve(frame.columns, data, str(source))
    required, optional = layout.columns(data)
    frame = _checked_frame(frame, source, required + ([data.answer_column] if data.answer_column else []), optional)
    return layout.read(frame, data, str(source))


def read_shard(
    source: Path | str, text_column: str, label_column: str, num_labels: int, label_names: list[str] | None = None,
    split: str = "train",
) -> Examples:
    frame = _read_frame(source, [text_column, label_column], split)
    labels = label_ids(frame[label_column], num_labels, label_names, f"{source}: column '{label_column}'")
    return Examples([str(t) for t in frame[text_column].tolist()], labels)


def _read_frame(source: Path | str, columns: list[str], split: str) -> Any:
    """The source's rows, refused in one line if it lacks one of ``columns``, has no rows or an empty value."""
    from fedlora_cli.data.sources import read_source

    return _checked_frame(read_source(str(source), split), source, columns)


def _checked_frame(frame: Any, source: Path | str, columns: list[str], optional: Sequence[str] = ()) -> Any:
    """``frame`` refused in one line if it lacks one of ``columns``, has no rows or an empty value in one; an
    ``optional`` column may be missing or hold empty values (read as empty text)."""
    if len(frame) == 0:
        raise FedloraError(f"{source} is empty")
    for column in columns:
        if column not in frame.columns:
            raise FedloraError(f"{source} has no column '{column}' (its columns: {listed(frame.columns)})")
    frame = frame.copy() if optional else frame
    for column in optional:
        frame[column] = frame[column].fillna("") if column in frame.columns else ""
    for column in columns:
        empty = frame[column].isna().to_numpy()
        if empty.any():
            raise FedloraError(
                f"{source}: column '{column}' has {int(empty.sum())} empty value(s), the first in data row "
                f"{int(empty.argmax()) + 1}"
            )
    return frame


def label_ids(values: Any, num_labels: int, label_names: list[str] | None, where: str) -> np.ndarray:
    """The label ids of a column of labels: an integer is a label id (0..num_labels-1, as a shard written by
    ``fedlora partition`` holds them); any other value is a label name, whose id is its place in ``label_names``
    (compared as text, the way partition numbered the names: ``True``, ``2.5``).

    Without ``label_names`` (a global checkpoint initialised without a partition folder, whose recipe does not
    list ``data.labels``) only ids are understood: a name is refused, there is nothing to number it by. Label
    names that are numbers (ratings "1".."5") are given as ids in an integer column: a CSV cannot tell the two.
    """
    import numpy as np

    if values.dtype.kind in "iu":  # a shard's label ids: read as they are
        ids = values.to_numpy().astype(np.int64)
    else:
        index = {name: i for i, name in enumerate(label_names or [])}
        ids = np.empty(len(values), dtype=np.int64)
        for k, value in enumerate(values.tolist()):
            if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
                ids[k] = value
            elif str(value) in index:
                ids[k] = index[str(value)]
            elif label_names is None:
                raise FedloraError(
                    f"{where} holds label names ('{value}') but the global checkpoint records none to number them "
                    f"by (init had no partition folder and the recipe no data.labels): give label ids 0..{num_labels - 1}"
                )
            else:
                raise FedloraError(
                    f"{where}: label '{value}' is not one the federation knows (its {len(label_names)} labels: "
                    f"{listed(label_names)})"
                )
    outside = (ids < 0) | (ids >= num_labels)
    if outside.any():
        # Label names that are numbers themselves (ratings 1..5) cannot be told from ids in an integer column.
        numeric = label_names is not None and all(name.lstrip("-").isdigit() for name in label_names)
        hint = f"; integers are read as ids, not as the label names {listed(label_names, 5)}" if numeric else ""
        raise FedloraError(
            f"{where}: label id {int(ids[outside.argmax()])} is out of range (the federation's label ids are "
            f"0..{num_labels - 1}{hint})"
        )
    return ids


def encode(
    tokenizer: Any, examples: Examples | CausalExamples, rows: Any, max_length: int
) -> dict[str, torch.Tensor]:
    """A padded batch of ``rows``: input_ids, attention_mask and labels (class ids, or per-token targets)."""
    import torch

    if isinstance(examples, CausalExamples):
        return encode_causal(tokenizer, examples, rows, max_length)
    batch = tokenizer(
        [examples.texts[i] for i in rows], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )
    batch["labels"] = torch.as_tensor(examples.labels[rows], dtype=torch.long)
    return dict(batch)


def fit(prompt: list[int], response: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Prompt and response cut to ``max_length`` tokens together: the response loses its end; a prompt that
    would leave no room for one response token loses its beginning."""
    prompt = prompt[-(max_length - 1):] if len(prompt) > max_length - 1 else prompt
    return prompt, response[: max_length - len(prompt)]


def fit_pieces(pieces: list[tuple[list[int], bool]], max_length: int) -> tuple[list[int], list[int]]:
    """An example's token ids and labels (the id where a piece carries a loss, else :data:`IGNORE_INDEX`), cut
    to ``max_length`` as :func:`fit` cuts a prompt and response: the prompt is everything before the first token
    with a loss, the response everything from it (later turns, with or without a loss, included)."""
    ids = [t for piece, _ in pieces for t in piece]
    labels = [t if trained else IGNORE_INDEX for piece, trained in pieces for t in piece]
    first = next((k for k, label in enumerate(labels) if label != IGNORE_INDEX), len(ids))
    prompt, response = fit(ids[:first], ids[first:], max_length)
    start = first - len(prompt)
    return prompt + response, labels[start : start + len(prompt) + len(response)]


def encode_causal(tokenizer: Any, examples: CausalExamples, rows: Any, max_length: int) -> dict[str, torch.Tensor]:
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [fit_pieces(examples.pieces(tokenizer, int(i)), max_length) for i in rows]
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    attention = torch.zeros((len(encoded), width), dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.long)
    for k, (ids, targets) in enumerate(encoded):
        input_ids[k, : len(ids)] = torch.as_tensor(ids)
        attention[k, : len(ids)] = 1
        labels[k, : len(ids)] = torch.as_tensor(targets)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def encode_prompts(tokenizer: Any, examples: CausalExamples, rows: Any, max_length: int) -> dict[str, torch.Tensor]:
    """Prompts alone, padded on the left (generation continues every row from its last column)."""
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompts = [examples.prompt_ids(tokenizer, int(i))[-(max_length - 1):] for i in rows]
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for k, p in enumerate(prompts):
        input_ids[k, width - len(p):] = torch.as_tensor(p)
        attention[k, width - len(p):] = 1
    return {"input_ids": input_ids, "attention_mask": attention}


# Length grouping sorts each run of this many batches by length (Hugging Face's LengthGroupedSampler uses 50).
GROUP_BATCHES = 50


def batch_schedule(
    n: int, batch_size: int, steps: int, rng: np.random.Generator, lengths: Sequence[int] | None = None
) -> list[np.ndarray]:
    """``steps`` batches drawn from seeded shuffled passes over ``n`` examples (a pass restarts when used up).

    With ``lengths`` (one per example) batches are length-grouped, so they pad little: each pass is shuffled as
    without, cut into runs of :data:`GROUP_BATCHES` batches whose examples are sorted by length, cut into
    batches, and the batches of the pass are shuffled. Every pass still trains every example it would have
    (the same ones), only in batches of similar length. For sampling without replacement only: DP-SGD's
    Poisson sampling must never be grouped, since its privacy analysis assumes each example is drawn
    independently of every other.
    """
    import numpy as np

    size = min(batch_size, n)
    batches: list[np.ndarray] = []
    while len(batches) < steps:
        order = rng.permutation(n)[: (n // size) * size]
        if lengths is None:
            batches.extend(order.reshape(-1, size))
            continue
        lengths_of = np.asarray(lengths)
        run = size * GROUP_BATCHES
        for start in range(0, len(order), run):
            piece = order[start : start + run]
            order[start : start + run] = piece[np.argsort(-lengths_of[piece], kind="stable")]
        grouped = order.reshape(-1, size)
        batches.extend(grouped[rng.permutation(len(grouped))])
    return [np.asarray(b) for b in batches[:steps]]


def lengths_of(examples: Examples | CausalExamples) -> list[int]:
    """Each example's length in characters (prompt plus responses for causal-lm): the tokens' proxy that length
    grouping and length-sorted evaluation sort by, without tokenising the shard first."""
    if isinstance(examples, CausalExamples):
        return examples.lengths()
    return [len(text) for text in examples.texts]


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
