"""Causal-LM examples as training and evaluation see them (:class:`CausalExamples`), and the single-turn kind,
a prompt and its response (:class:`PromptResponses`); multi-turn conversations are
:class:`fedlora_cli.data.conversations.Conversations`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedlora_cli.errors import FedloraError


class CausalExamples:
    """Causal-LM examples of any layout, as training and evaluation see them: each example is a run of token
    pieces, each with or without a loss; generation continues the context of its last piece with a loss, whose
    reference text exact match scores against (unless ``answers`` gives the checkable answers)."""

    answers: list[str] | None

    def __len__(self) -> int:
        raise NotImplementedError

    def pieces(self, tokenizer: Any, i: int) -> list[tuple[list[int], bool]]:
        """Example ``i``'s token ids in order, in pieces that each carry a loss (True) or not."""
        raise NotImplementedError

    def prompt_ids(self, tokenizer: Any, i: int) -> list[int]:
        """What the model sees before the last response of example ``i``: the prompt generation continues."""
        raise NotImplementedError

    def reference(self, i: int) -> str:
        """The text of example ``i``'s last response."""
        raise NotImplementedError

    def lengths(self) -> list[int]:
        """Each example's length in characters (the tokens' proxy that batching sorts by)."""
        raise NotImplementedError

    def prompt_lengths(self) -> list[int]:
        """Each example's generation prompt's length in characters."""
        raise NotImplementedError


@dataclass
class PromptResponses(CausalExamples):
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

    def pieces(self, tokenizer: Any, i: int) -> list[tuple[list[int], bool]]:
        return [(self.prompt_ids(tokenizer, i), False), (response_ids(tokenizer, self.responses[i]), True)]

    def prompt_ids(self, tokenizer: Any, i: int) -> list[int]:
        return prompt_ids(tokenizer, self.prompts[i], self.chat_template)

    def reference(self, i: int) -> str:
        return self.responses[i]

    def lengths(self) -> list[int]:
        return [len(p) + len(r) for p, r in zip(self.prompts, self.responses)]

    def prompt_lengths(self) -> list[int]:
        return [len(p) for p in self.prompts]


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
