"""Metrics of an adapted model on held-out examples, for each task.

sequence-classification: accuracy, macro-F1 and the mean cross-entropy loss per example.

causal-lm:

- ``loss``: the mean negative log-likelihood per response token over the whole test split (token-weighted:
  a long response counts for more than a short one, the usual definition), and ``perplexity`` = exp(loss).
  Prompt tokens carry no loss, exactly as in training.
- ``exact_match`` (with ``evaluation.answer: number``): for each of the first ``evaluation.generate_examples``
  test prompts, a response generated greedily (deterministic: no sampling, one beam) of at most
  ``evaluation.max_new_tokens`` tokens; its final number (:func:`extract_number`) is compared with the gold
  answer (``data.answer_column``, or the final number of the reference response). ``hit_cap`` counts the
  generations stopped by the cap rather than by EOS: many of them mean the cap is too small to judge.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

from fedlora_cli.data.examples import CausalExamples, Examples, encode_prompts
from fedlora_cli.model.site import to_device
from fedlora_cli.model.workbench import Workbench

if TYPE_CHECKING:
    import numpy as np


def macro_f1(predictions: np.ndarray, labels: np.ndarray, num_labels: int) -> float:
    """Unweighted mean of per-class F1 over the classes present in labels or predictions."""
    import numpy as np

    scores = []
    for c in range(num_labels):
        tp = int(np.sum((predictions == c) & (labels == c)))
        fp = int(np.sum((predictions == c) & (labels != c)))
        fn = int(np.sum((predictions != c) & (labels == c)))
        if tp + fp + fn == 0:
            continue
        scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else 0.0


def evaluate(
    bench: Workbench, examples: Examples | CausalExamples, progress: Callable[[int, int], None] | None = None
) -> dict[str, Any]:
    """The task's metrics (see the module docstring); ``progress(done, total)`` after every batch; with the site's
    CPU threads (``training.threads``)."""
    with bench.site.cpu_threads():
        if isinstance(examples, CausalExamples):
            return evaluate_causal(bench, examples, progress)
        return evaluate_classification(bench, examples, progress)


def evaluate_classification(
    bench: Workbench, examples: Examples, progress: Callable[[int, int], None] | None = None
) -> dict[str, Any]:
    import numpy as np
    import torch

    model = bench.model
    model.eval()
    size = bench.recipe.training.eval_batch_size
    # Batches of similar length pad less: sorting by text length makes evaluation about twice as fast.
    order = np.argsort([len(text) for text in examples.texts], kind="stable")
    predicted = np.empty(len(examples), dtype=np.int64)
    total_loss = 0.0
    starts = list(range(0, len(examples), size))
    with torch.no_grad():
        for i, start in enumerate(starts, start=1):
            rows = order[start : start + size]
            batch = bench.batch(examples, rows)
            with bench.site.autocast():
                logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
            total_loss += float(torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum"))
            predicted[rows] = logits.argmax(dim=-1).cpu().numpy()
            if progress is not None:
                progress(i, len(starts))
    num_labels = int(model.config.num_labels) if hasattr(model, "config") else int(predicted.max()) + 1
    correct = predicted == examples.labels
    return {
        "accuracy": float(np.mean(correct)),
        "macro_f1": macro_f1(predicted, examples.labels, num_labels),
        "loss": total_loss / len(examples),
        "examples": len(examples),
        # Recall of every class (None where the test split holds none): what accuracy_on_mix reweights.
        "class_recall": [
            float(np.mean(correct[examples.labels == c])) if np.any(examples.labels == c) else None
            for c in range(num_labels)
        ],
    }


def accuracy_on_mix(class_recall: Sequence[float | None], label_counts: Sequence[int]) -> float | None:
    """The accuracy a classifier would have on test data with this label mix: sum_c (n_c / n) recall_c.

    Under label skew (Dirichlet partitions) a client's own data follows its label counts, not the shared test
    split's, so this is the fair measure of a personalised model on the shared test split (the class
    conditionals are the same everywhere; only the mix differs). None if a class the mix needs is missing
    from the test split.
    """
    total = sum(label_counts)
    if total == 0 or len(class_recall) != len(label_counts):
        return None
    value = 0.0
    for recall, count in zip(class_recall, label_counts):
        if count == 0:
            continue
        if recall is None:
            return None
        value += count / total * recall
    return value


# --------------------------------------------------------------------------------------------------------
# causal-lm


# A number as models write it: an optional sign, an optional currency sign, thousands separators, decimals.
_NUMBER = re.compile(r"(?<![\w.])([-−]?)\s*\$?\s*([-−]?)(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?")
_MARKED = (
    re.compile(r"####\s*([^\n]*)"),                                      # GSM8K's final-answer line
    re.compile(r"\\boxed\s*\{([^{}]*)\}"),                              # LaTeX \boxed{42}
    re.compile(r"answer\s*(?:is|:|=)\s*:?\s*([^\n]*)", re.IGNORECASE),  # "The answer is 42." / "Answer: 42"
)


def _numbers(text: str) -> list[str]:
    found = []
    for match in _NUMBER.finditer(text):
        sign = "-" if (match.group(1) or match.group(2)) else ""
        found.append(sign + match.group(3).replace(",", "") + (match.group(4) or ""))
    return found


def canonical_number(text: str) -> str | None:
    """A number written as digits in one canonical form: '42', '-3.5', '1234' (from '1,234.00'); else None."""
    try:
        value = Decimal(text)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    value = value.normalize()
    if value == value.to_integral_value():
        return str(int(value))
    return format(value, "f")


def extract_number(text: str) -> str | None:
    """The final answer of a math word problem's solution, as a canonical number; None if it states none.

    The most explicit marker wins, and the last of its kind: a '#### N' line, then '\\boxed{N}', then
    'the answer is N' / 'Answer: N'; without any marker, the last number in the text. Currency signs,
    thousands separators, a trailing full stop and trailing words are ignored ('$1,234.' is 1234).
    """
    for pattern in _MARKED:
        for candidate in reversed(pattern.findall(text)):
            numbers = _numbers(candidate)
            if numbers:
                return canonical_number(numbers[0])
    numbers = _numbers(text)
    return canonical_number(numbers[-1]) if numbers else None


ANSWER_EXTRACTORS: dict[str, Callable[[str], str | None]] = {"number": extract_number}


@dataclass
class Generation:
    """One greedy generation: the new tokens (EOS and anything after it removed) and their text."""

    tokens: list[int]
    text: str
    hit_cap: bool  # stopped by max_new_tokens rather than by EOS


def generate(
    bench: Workbench,
    examples: CausalExamples,
    rows: Any,
    max_new_tokens: int,
    progress: Callable[[int], None] | None = None,
) -> list[Generation]:
    """Greedy responses to the prompts of ``rows``, in that order; batches of ``training.eval_batch_size``
    prompts of similar length, padded on the left."""
    import numpy as np
    import torch

    tokenizer, model = bench.tokenizer, bench.model
    rows = np.asarray(rows, dtype=np.int64)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    size = bench.recipe.training.eval_batch_size
    prompt_lengths = examples.prompt_lengths()
    order = rows[np.argsort([prompt_lengths[i] for i in rows], kind="stable")]
    results: dict[int, Generation] = {}
    model.eval()
    with torch.no_grad():
        for start in range(0, len(order), size):
            chunk = order[start : start + size]
            batch = to_device(encode_prompts(tokenizer, examples, chunk, bench.recipe.data.max_length), bench.site.device)
            with bench.site.autocast():
                output = model.generate(
                    **batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad,
                    eos_token_id=eos, temperature=None, top_p=None, top_k=None,
                )
            for k, i in enumerate(chunk):
                new = output[k, batch["input_ids"].shape[1]:].tolist()
                stop = new.index(eos) if eos in new else None
                tokens = new[:stop] if stop is not None else new
                results[int(i)] = Generation(tokens, tokenizer.decode(tokens, skip_special_tokens=True), stop is None)
            if progress is not None:
                progress(len(chunk))
    return [results[int(i)] for i in rows]


def evaluate_causal(
    bench: Workbench, examples: CausalExamples, progress: Callable[[int, int], None] | None = None
) -> dict[str, Any]:
    import numpy as np
    import torch

    from fedlora_cli.model.training import causal_token_losses

    settings = bench.recipe.evaluation
    size = bench.recipe.training.eval_batch_size
    order = np.argsort(examples.lengths(), kind="stable")
    starts = list(range(0, len(examples), size))
    generate_rows = np.arange(0)
    if settings.answer != "none":
        generate_rows = np.arange(min(len(examples), settings.generate_examples or len(examples)))
    generate_batches = math.ceil(len(generate_rows) / size)
    total = len(starts) + generate_batches
    done = 0

    def step(_: int = 0) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    bench.model.eval()
    total_loss, total_tokens = 0.0, 0
    with torch.no_grad():
        for start in starts:
            batch = bench.batch(examples, order[start : start + size])
            with bench.site.autocast():
                losses, mask = causal_token_losses(bench.model, batch)
            total_loss += float((losses * mask).sum(dtype=torch.float64))
            total_tokens += int(mask.sum())
            step()
    loss = total_loss / max(total_tokens, 1)
    metrics: dict[str, Any] = {
        "loss": loss,
        "perplexity": math.exp(loss) if loss < 700 else math.inf,
        "response_tokens": total_tokens,
        "examples": len(examples),
        "exact_match": None,
        "generated": 0,
        "hit_cap": 0,
        "max_new_tokens": settings.max_new_tokens if settings.answer != "none" else None,
    }
    if settings.answer == "none":
        return metrics
    generations = generate(bench, examples, generate_rows, settings.max_new_tokens, step)
    metrics.update(_exact_match(examples, generate_rows, generations, ANSWER_EXTRACTORS[settings.answer]))
    return metrics


def _exact_match(
    examples: CausalExamples, rows: Sequence[int], generations: Sequence[Generation], extract: Callable[[str], str | None]
) -> dict[str, Any]:
    """Exact match of the extracted answers over the examples whose gold answer can be extracted (``scored``)."""
    correct = scored = 0
    for i, g in zip(rows, generations):
        gold = examples.answers[i] if examples.answers is not None else examples.reference(i)
        expected = canonical_number(gold.strip()) if examples.answers is not None else None
        expected = expected if expected is not None else extract(gold)
        if expected is None:
            continue
        scored += 1
        correct += int(extract(g.text) == expected)
    return {"exact_match": correct / scored if scored else None, "generated": len(generations), "scored": scored,
            "hit_cap": sum(g.hit_cap for g in generations)}
