"""Multi-turn conversations as causal-LM examples, with the loss on the assistant's turns only.

A conversation is a list of ``{"role", "content"}`` turns (TRL's conversational format). The tokenizer's chat
template renders it; the tokens of each assistant turn carry a loss, every other token (system and user turns,
the template's markers, the generation prompt that opens each assistant turn) is context without one.

The boundary of each turn is found by rendering prefixes: for an assistant turn k, the template's text of
turns 0..k-1 with the generation prompt ends where the turn's own text starts, and the text of turns 0..k
without it ends where the turn ends. The turn's piece is the difference, its end-of-turn marker included (so
the model learns to stop) and the whitespace the template writes after the marker excluded. Every piece is
tokenised on its own, so no token straddles a boundary: the mask is exact whatever the tokenizer merges. A
template that does not render a conversation as the concatenation of its prefixes (one that rewrites earlier
turns, e.g. drops their reasoning) cannot be cut this way and is refused in one line, naming the row.

Turns before ``first_trained`` are context even when they are the assistant's: a conversational
prompt/completion row trains on its completion only, as TRL does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedlora_cli.data.causal import CausalExamples
from fedlora_cli.errors import FedloraError, first_line

ASSISTANT = "assistant"


@dataclass
class Conversations(CausalExamples):
    messages: list[list[dict[str, str]]]
    first_trained: list[int]  # per conversation: turns before this index carry no loss
    answers: list[str] | None = None

    def __len__(self) -> int:
        return len(self.messages)

    def trained_turns(self, i: int) -> list[int]:
        first = self.first_trained[i]
        return [k for k, turn in enumerate(self.messages[i]) if turn["role"] == ASSISTANT and k >= first]

    def pieces(self, tokenizer: Any, i: int) -> list[tuple[list[int], bool]]:
        return [(_ids(tokenizer, text), trained) for text, trained in text_pieces(tokenizer, self.messages[i],
                                                                                   self.trained_turns(i), i)]

    def prompt_ids(self, tokenizer: Any, i: int) -> list[int]:
        last = self.trained_turns(i)[-1]
        return _ids(tokenizer, render(tokenizer, self.messages[i][:last], True, i))

    def reference(self, i: int) -> str:
        return self.messages[i][self.trained_turns(i)[-1]]["content"]

    def lengths(self) -> list[int]:
        return [sum(len(turn["content"]) for turn in turns) for turns in self.messages]

    def prompt_lengths(self) -> list[int]:
        return [sum(len(turn["content"]) for turn in self.messages[i][: self.trained_turns(i)[-1]])
                for i in range(len(self))]


def render(tokenizer: Any, turns: list[dict[str, str]], generation_prompt: bool, row: int) -> str:
    """The chat template's text of ``turns`` (the tokenizer's own template, special tokens written as text)."""
    if not getattr(tokenizer, "chat_template", None):
        raise FedloraError("conversations need a chat template, and the base model's tokenizer has none")
    try:
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as exc:  # jinja raises its own errors (roles that must alternate, ...); all mean one thing
        raise FedloraError(f"the chat template cannot render conversation {row + 1}: {first_line(exc)}") from None


def text_pieces(tokenizer: Any, turns: list[dict[str, str]], trained: list[int], row: int) -> list[tuple[str, bool]]:
    """The conversation's text up to its last trained turn, cut at each trained turn's exact boundaries (see
    the module docstring); pieces with a loss are marked True. Turns after the last trained one are left out:
    they would carry no loss."""
    pieces: list[tuple[str, bool]] = []
    done = ""
    for k in trained:
        before = render(tokenizer, turns[:k], True, row)
        after = render(tokenizer, turns[: k + 1], False, row)
        if not before.startswith(done) or not after.startswith(before):
            raise FedloraError(
                f"the chat template does not render conversation {row + 1} turn by turn (turn {k + 1}'s text does not "
                "extend the text before it), so its assistant turns cannot be told apart exactly"
            )
        turn = after[len(before):].rstrip()
        pieces += [(before[len(done):], False), (turn, True)]
        done = before + turn
    return [(text, trained) for text, trained in pieces if text]


def _ids(tokenizer: Any, text: str) -> list[int]:
    # The template writes the special tokens (BOS, turn markers) as text itself.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
