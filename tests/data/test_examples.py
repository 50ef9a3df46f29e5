"""fedlora_cli.data.examples: encoding causal-lm examples: labels on the response and EOS only, and truncation."""

from __future__ import annotations

from conftest import PAIRS

from fedlora_cli.data.examples import IGNORE_INDEX, encode, fit, prompt_ids, response_ids
from fedlora_cli.model.workbench import build


def test_labels_cover_the_response_and_eos_only(make_causal_recipe):
    bench = build(make_causal_recipe(), None)
    tok = bench.tokenizer
    batch = encode(tok, PAIRS, [0, 1], 64)
    for k in range(2):
        p = prompt_ids(tok, PAIRS.prompts[k], True)
        r = response_ids(tok, PAIRS.responses[k])
        n = len(p) + len(r)
        assert r[-1] == tok.eos_token_id
        assert batch["input_ids"][k, :n].tolist() == p + r
        assert (batch["labels"][k, : len(p)] == IGNORE_INDEX).all(), "prompt tokens carry no loss"
        assert batch["labels"][k, len(p) : n].tolist() == r
        assert (batch["labels"][k, n:] == IGNORE_INDEX).all() and (batch["attention_mask"][k, n:] == 0).all()
    # The chat template wraps the prompt as a user turn and opens the assistant's.
    text = tok.decode(prompt_ids(tok, PAIRS.prompts[0], True))
    assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_start|>assistant\n")


def test_truncation_keeps_the_end_of_the_prompt_and_the_start_of_the_response():
    assert fit([1, 2, 3], [7, 8, 9], 5) == ([1, 2, 3], [7, 8])
    assert fit([1, 2, 3, 4, 5, 6], [7, 8], 4) == ([4, 5, 6], [7])
    assert fit([1], [7, 8], 64) == ([1], [7, 8])
