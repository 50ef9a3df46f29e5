"""Tiny lm-eval tasks with local data, written into a folder, and the scores they must give computed by hand with one
plain forward pass per text (what tests/model/test_harness.py, tests/cli/test_lm_eval.py and the SmolLM2 integration
test share)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

# Multiple choice: a question, three choices and the correct one's index. The tiny Llama is random and picks
# nearly at random, so accuracy says little here; the Brier score (of the softmax over the choices' log-likelihoods)
# checks every choice's log-likelihood.
QUESTIONS = [
    ("Sam has 3 apples and the rule is add 4. How many apples?", ["12", "7", "1"], 1),
    ("Sam has 10 apples and the rule is sub 2. How many apples?", ["8", "12", "20"], 0),
    ("Sam has 6 apples and the rule is mul 3. How many apples?", ["9", "18", "3"], 1),
    ("Sam has 25 apples and the rule is add 30. How many apples?", ["45", "5", "55"], 2),
    ("Sam has 9 apples and the rule is sub 9. How many apples?", ["0", "18", "81"], 0),
    ("Sam has 4 apples and the rule is mul 12. How many apples?", ["16", "48", "8"], 1),
    ("Sam has 7 apples and the rule is add 7. How many apples?", ["49", "0", "14"], 2),
    ("Sam has 30 apples and the rule is sub 12. How many apples?", ["18", "42", "2"], 0),
]
TEXTS = ["Sam has 12 apples and the rule is add 5.", "12 * 2 = 24\n#### 24", "How many apples?"]

# Every task here reads its test split from the JSON Lines file beside its YAML. Each template is a format string
# (``{name}``, ``{data}`` and its own fields): lm-eval's Jinja braces are doubled twice over.
HEADER = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
"""

MC_TASK = """\
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
  - metric: brier_score
"""

TEXT_TASK = """\
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: bits_per_byte
"""


def write_task(folder: Path, name: str, rows: list[dict], template: str, **fields) -> None:
    """lm-eval task ``name`` in ``folder``: ``rows`` as ``<name>.jsonl`` and ``<name>.yaml``, :data:`HEADER` then
    ``template`` (formatted with ``fields``)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / f"{name}.yaml").write_text((HEADER + template).format(name=name, data=data, **fields))


def write_tasks(folder: Path, questions=None, texts=None) -> Path:
    """A folder of two lm-eval tasks over JSONL files beside them: tiny_mc (multiple choice over ``questions``,
    default QUESTIONS) and tiny_text (the log-likelihood of each of ``texts``, default TEXTS)."""
    mc = [{"question": q, "choices": choices, "label": gold} for q, choices, gold in questions or QUESTIONS]
    write_task(folder, "tiny_mc", mc, MC_TASK)
    write_task(folder, "tiny_text", [{"text": text} for text in texts or TEXTS], TEXT_TASK)
    return folder


def loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context), encoded as lm-eval encodes a pair (the context's trailing whitespace moved to
    the continuation; the whole, split after the context's tokens), scored with one forward pass."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, ctx = tokenizer.encode(context + continuation), tokenizer.encode(context)
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([whole])).logits.float().log_softmax(-1)[0]
    return sum(float(logp[i - 1, whole[i]]) for i in range(len(ctx), len(whole)))


def hand_scores(model, tokenizer, questions=None, chat: bool = False) -> dict[str, float]:
    """acc, acc_norm (log-likelihood per character of the choice) and the Brier score over ``questions`` (QUESTIONS).
    With ``chat``, the prompt is a user turn through the tokenizer's chat template, followed by the assistant turn's
    header, and each choice follows it with no space (lm-eval's --apply_chat_template)."""
    hits, hits_norm, brier = [], [], []
    for q, choices, gold in questions or QUESTIONS:
        prompt, delimiter = f"Question: {q}\nAnswer:", " "
        if chat:
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                   add_generation_prompt=True)
            delimiter = ""
        lls = np.array([loglikelihood(model, tokenizer, prompt, delimiter + c) for c in choices])
        hits.append(int(np.argmax(lls)) == gold)
        hits_norm.append(int(np.argmax(lls / np.array([len(c) for c in choices]))) == gold)
        probabilities = np.exp(lls - lls.max()) / np.exp(lls - lls.max()).sum()
        brier.append(float(np.sum((probabilities - np.eye(len(choices))[gold]) ** 2)))
    return {"acc": float(np.mean(hits)), "acc_norm": float(np.mean(hits_norm)), "brier_score": float(np.mean(brier))}


def hand_bits_per_byte(model, tokenizer, texts=None) -> float:
    """Every token of every text (``texts``, default TEXTS) scored after the BOS token (EOS without one), as lm-eval
    scores a text whole: the sum in nats, over the texts' UTF-8 bytes, in bits."""
    texts = texts or TEXTS
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    total = 0.0
    for text in texts:
        ids = [prefix, *tokenizer.encode(text)]
        with torch.no_grad():
            logp = model(input_ids=torch.tensor([ids])).logits.float().log_softmax(-1)[0]
        total += sum(float(logp[i - 1, ids[i]]) for i in range(1, len(ids)))
    return -total / sum(len(t.encode()) for t in texts) / math.log(2)


GEN_TASK = """\
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n\\n"]
  max_gen_toks: {tokens}
  do_sample: false
metric_list:
  - metric: exact_match
"""


def greedy(model, tokenizer, prompt: str, tokens: int) -> str:
    """The greedy continuation of ``prompt``, one forward pass per token, up to ``tokens`` tokens or EOS; decoded
    without special tokens and cut at the first blank line, as lm-eval cuts a generation at its stop sequence."""
    ids, new = tokenizer.encode(prompt), []
    with torch.no_grad():
        for _ in range(tokens):
            following = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
            new.append(following)
            if following == tokenizer.eos_token_id:
                break
    return tokenizer.decode(new, skip_special_tokens=True).split("\n\n")[0]


def write_generation_task(folder: Path, questions: list[str], answers: list[str], tokens: int) -> Path:
    """tiny_gen: each question's expected answer, scored by exact match of a greedy generation of ``tokens``."""
    write_task(folder, "tiny_gen", [{"question": q, "answer": a} for q, a in zip(questions, answers)], GEN_TASK,
               tokens=tokens)
    return folder
