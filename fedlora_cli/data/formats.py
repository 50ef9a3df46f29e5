"""The layouts of instruction data a causal-lm federation reads (``data.format``), and how each becomes examples.

- ``messages``: TRL's conversational format, a column (``data.messages_column``) whose every row is a list of
  ``{"role", "content"}`` turns, multi-turn, optionally with a system turn. The chat template renders it and
  the loss is on every assistant turn (:mod:`fedlora_cli.data.conversations`). In a CSV the cell holds the
  list as JSON. Only the role and the content of a turn are read (not tool calls).
- ``prompt-response``: fedlora's own, ``data.prompt_column`` -> ``data.response_column`` (one turn; with
  ``data.chat_template`` the prompt is a user turn).
- ``prompt-completion``: TRL's ``prompt`` and ``completion`` columns. Strings are a prompt and its response,
  as above. Lists of turns (TRL's conversational prompt-completion) are one conversation, prompt then
  completion, whose loss is on the completion's assistant turns only: an assistant turn in the prompt is
  context.
- ``alpaca``: Stanford Alpaca's ``instruction``, ``input`` (may be missing or empty) and ``output``. With
  ``data.chat_template`` the user turn is the instruction, then a blank line and the input when there is one;
  without, Alpaca's own prompt ("Below is an instruction ...  ### Response:") precedes the output.

``auto`` (the default) takes the first layout whose columns the data has, in that order. ``fedlora
partition`` keeps the layout's columns in the shards, so every shard reads as its source did.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedlora_cli.data.conversations import ASSISTANT, Conversations
from fedlora_cli.data.causal import CausalExamples, PromptResponses
from fedlora_cli.errors import FedloraError
from fedlora_cli.text import listed

if TYPE_CHECKING:
    import pandas as pd

    from fedlora_cli.recipe.schema import DataSection

AUTO = "auto"
# Stanford Alpaca's prompts (github.com/tatsu-lab/stanford_alpaca), for rows read without a chat template.
ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task{paired}. Write a response that appropriately completes the request."
)
ALPACA_PAIRED = ", paired with an input that provides further context"


@dataclass(frozen=True)
class Layout:
    """One layout: the columns it needs and may have (given the recipe's column names), and its reader."""

    name: str
    required: Callable[[DataSection], list[str]]
    optional: tuple[str, ...]
    reader: Callable[[pd.DataFrame, DataSection, str], CausalExamples]

    def columns(self, data: DataSection) -> tuple[list[str], list[str]]:
        return self.required(data), list(self.optional)

    def read(self, frame: pd.DataFrame, data: DataSection, where: str) -> CausalExamples:
        return self.reader(frame, data, where)


def _answers(frame: pd.DataFrame, data: DataSection) -> list[str] | None:
    return [str(a) for a in frame[data.answer_column].tolist()] if data.answer_column else None


def _read_messages(frame: pd.DataFrame, data: DataSection, where: str) -> CausalExamples:
    conversations = [turns(v, f"{where}: row {k + 1}") for k, v in enumerate(frame[data.messages_column].tolist())]
    for k, conversation in enumerate(conversations):
        _need_assistant(conversation, 0, f"{where}: row {k + 1}")
    return Conversations(conversations, [0] * len(conversations), _answers(frame, data))


def _read_prompt_response(frame: pd.DataFrame, data: DataSection, where: str) -> CausalExamples:
    return PromptResponses([str(t) for t in frame[data.prompt_column].tolist()],
                           [str(t) for t in frame[data.response_column].tolist()], _answers(frame, data),
                           data.chat_template)


def _read_prompt_completion(frame: pd.DataFrame, data: DataSection, where: str) -> CausalExamples:
    prompts, completions = frame["prompt"].tolist(), frame["completion"].tolist()
    kinds = {isinstance(v, str) for v in prompts + completions}
    if kinds == {True}:
        return PromptResponses(prompts, completions, _answers(frame, data), data.chat_template)
    if kinds != {False}:
        raise FedloraError(f"{where}: 'prompt' and 'completion' must be all strings or all lists of turns, not both")
    conversations, firsts = [], []
    for k, (prompt, completion) in enumerate(zip(prompts, completions)):
        row = f"{where}: row {k + 1}"
        head = turns(prompt, row)
        conversations.append(head + turns(completion, row))
        firsts.append(len(head))
        _need_assistant(conversations[-1], len(head), row + "'s completion")
    return Conversations(conversations, firsts, _answers(frame, data))


def _read_alpaca(frame: pd.DataFrame, data: DataSection, where: str) -> CausalExamples:
    prompts = [alpaca_prompt(str(i), str(x), data.chat_template)
               for i, x in zip(frame["instruction"].tolist(), frame["input"].tolist())]
    return PromptResponses(prompts, [str(o) for o in frame["output"].tolist()], _answers(frame, data),
                           data.chat_template)


def alpaca_prompt(instruction: str, input_: str, chat_template: bool) -> str:
    """The prompt of an Alpaca row: the user turn's text, or Alpaca's own prompt without a chat template."""
    if chat_template:
        return f"{instruction}\n\n{input_}" if input_ else instruction
    preamble = ALPACA_PREAMBLE.format(paired=ALPACA_PAIRED if input_ else "")
    context = f"### Input:\n{input_}\n\n" if input_ else ""
    return f"{preamble}\n\n### Instruction:\n{instruction}\n\n{context}### Response:\n"


FORMATS: dict[str, Layout] = {
    layout.name: layout
    for layout in (
        Layout("prompt-response", lambda d: [d.prompt_column, d.response_column], (), _read_prompt_response),
        Layout("messages", lambda d: [d.messages_column], (), _read_messages),
        Layout("prompt-completion", lambda d: ["prompt", "completion"], (), _read_prompt_completion),
        Layout("alpaca", lambda d: ["instruction", "output"], ("input",), _read_alpaca),
    )
}
AUTO_ORDER = ("messages", "prompt-response", "prompt-completion", "alpaca")


def resolve(columns: Any, data: DataSection, where: str) -> Layout:
    """The layout ``data.format`` names, or under ``auto`` the first of :data:`AUTO_ORDER` whose columns are all
    in ``columns``."""
    if data.format != AUTO:
        return FORMATS[data.format]
    present = set(map(str, columns))
    for name in AUTO_ORDER:
        if set(FORMATS[name].required(data)) <= present:
            return FORMATS[name]
    needs = "; ".join(f"{name}: {listed(FORMATS[name].required(data))}" for name in AUTO_ORDER)
    raise FedloraError(f"{where}: its columns ({listed(columns)}) match no causal-lm data format ({needs})")


def turns(value: Any, where: str) -> list[dict[str, str]]:
    """A list of turns as plain ``{"role", "content"}`` dicts, from a list (JSON Lines), an array (Parquet, the
    Hub) or JSON text (a CSV cell); refused in one line unless every turn has a text role and content."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise FedloraError(f"{where}: the turns are text that is not JSON") from None
    if isinstance(value, (str, bytes, Mapping)) or not hasattr(value, "__len__") or len(value) == 0:
        raise FedloraError(f"{where}: the turns must be a non-empty list of {{'role', 'content'}} objects")
    out = []
    for k, turn in enumerate(value, start=1):
        role = turn.get("role") if isinstance(turn, Mapping) else None
        content = turn.get("content") if isinstance(turn, Mapping) else None
        if not isinstance(role, str) or not isinstance(content, str):
            raise FedloraError(f"{where}: turn {k} needs a text 'role' and 'content'")
        out.append({"role": role, "content": content})
    return out


def _need_assistant(conversation: list[dict[str, str]], first: int, where: str) -> None:
    if not any(turn["role"] == ASSISTANT for turn in conversation[first:]):
        raise FedloraError(f"{where} has no '{ASSISTANT}' turn to learn")
