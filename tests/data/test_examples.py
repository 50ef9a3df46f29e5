"""fedlora_cli.data.examples: encoding causal-lm examples (labels on the response and EOS only, truncation), and
reading a site's own data through the recipe: label names or ids, and every bad file refused in one line."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import PAIRS

from fedlora_cli.data.examples import IGNORE_INDEX, encode, fit, label_ids, prompt_ids, read_examples, response_ids
from fedlora_cli.errors import FedloraError
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


# --------------------------------------------------------------------------------------------------------
# A site's own data: any source partition reads, through the recipe's columns and the federation's labels


def test_a_csv_with_label_names_reads_like_its_shard(make_recipe, reviews_csv, partition_dir):
    """The partition's own CSV, read as a site's data, gives each text the id partition gave it."""
    data = make_recipe().data
    own = read_examples(reviews_csv, data, "sequence-classification", 2, ["neg", "pos"])
    assert len(own) == 400 and own.labels.dtype == np.int64
    ids = dict(zip(own.texts, own.labels.tolist()))
    shard = read_examples(partition_dir / "client-0.parquet", data, "sequence-classification", 2)
    assert [ids[t] for t in shard.texts] == shard.labels.tolist()


@pytest.mark.parametrize("values, expected", [
    ([1, 0, 1], [1, 0, 1]),  # ids, as a shard holds them
    (["pos", "neg", "pos"], [1, 0, 1]),  # names
    (["pos", 0, np.int64(1)], [1, 0, 1]),  # a JSON column mixing both
])
def test_labels_are_names_or_ids(values, expected):
    assert label_ids(pd.Series(values), 2, ["neg", "pos"], "own.csv").tolist() == expected


def test_labels_are_named_by_their_text_as_partition_named_them():
    assert label_ids(pd.Series([True, False]), 2, ["False", "True"], "own.csv").tolist() == [1, 0]
    assert label_ids(pd.Series([2.5, 1.0]), 2, ["1.0", "2.5"], "own.csv").tolist() == [1, 0]


def test_bad_labels_are_refused_by_name():
    names = [f"topic-{i}" for i in range(30)]
    with pytest.raises(FedloraError, match=r"label 'sport' is not one the federation knows \(its 30 labels: "
                                           r"topic-0, .*topic-9, \.\.\. \(20 more\)\)"):
        label_ids(pd.Series(["topic-3", "sport"]), 30, names, "own.csv: column 'topic'")
    with pytest.raises(FedloraError, match=r"label id 2 is out of range \(the federation's label ids are 0\.\.1\)"):
        label_ids(pd.Series([0, 2, 1]), 2, ["neg", "pos"], "own.csv")
    with pytest.raises(FedloraError, match=r"label id 5 is out of range \(.* 0\.\.4; integers are read as ids, not "
                                           r"as the label names 1, 2, 3, 4, 5\)"):
        label_ids(pd.Series([1, 5]), 5, ["1", "2", "3", "4", "5"], "ratings.csv")
    with pytest.raises(FedloraError, match=r"label id -1 is out of range"):
        label_ids(pd.Series(["pos", -1], dtype=object), 2, ["neg", "pos"], "own.csv")
    # A global checkpoint that records no label names understands ids only.
    assert label_ids(pd.Series([1, 0]), 2, None, "own.csv").tolist() == [1, 0]
    with pytest.raises(FedloraError, match=r"holds label names \('pos'\) .* give label ids 0\.\.1"):
        label_ids(pd.Series(["pos"]), 2, None, "own.csv")


def test_bad_files_are_refused_in_one_line(make_recipe, tmp_path):
    data = make_recipe().data

    def read(name: str, text: str):
        path = tmp_path / name
        path.write_text(text)
        return read_examples(path, data, "sequence-classification", 2, ["neg", "pos"])

    with pytest.raises(FedloraError, match=r"no-label\.csv has no column 'sentiment' \(its columns: text, label\)"):
        read("no-label.csv", "text,label\ngood film,pos\n")
    with pytest.raises(FedloraError, match=r"header\.csv is empty"):
        read("header.csv", "text,sentiment\n")
    with pytest.raises(FedloraError, match=r"gap\.csv: column 'text' has 1 empty value\(s\), the first in data row 2"):
        read("gap.csv", "text,sentiment\ngood film,pos\n,neg\n")
    with pytest.raises(FedloraError, match=r"cannot read .*broken\.jsonl"):
        read("broken.jsonl", '{"text": "good", "sentiment": "pos"}\n{"text":')


def test_a_jsonl_of_prompts_reads_through_the_recipe(make_causal_recipe, math_jsonl):
    data = make_causal_recipe().data
    own = read_examples(math_jsonl, data, "causal-lm", None)
    assert len(own) == 150 and own.answers is not None and own.chat_template
    assert own.prompts[0].startswith("Sam has") and own.responses[0].split("#### ")[1] == own.answers[0]


# Batching: seeded passes, grouped by length ------------------------------------------------------------------------


def _lengths(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(5, 200, size=n)


def test_ungrouped_batches_are_consecutive_pieces_of_seeded_passes():
    from fedlora_cli.data.examples import batch_schedule

    order = np.random.default_rng(4).permutation(103)
    batches = batch_schedule(103, 10, 10, np.random.default_rng(4))
    assert [b.tolist() for b in batches] == [order[i * 10 : (i + 1) * 10].tolist() for i in range(10)]


def test_a_grouped_pass_trains_the_examples_the_ungrouped_pass_would_in_batches_of_similar_length():
    from fedlora_cli.data.examples import batch_schedule

    n, size, lengths = 2000, 16, _lengths(2000)
    steps = n // size  # one pass
    plain = batch_schedule(n, size, steps, np.random.default_rng(1))
    grouped = batch_schedule(n, size, steps, np.random.default_rng(1), lengths)
    assert sorted(np.concatenate(grouped).tolist()) == sorted(np.concatenate(plain).tolist())
    assert all(len(b) == size for b in grouped)

    def padding(batches):  # padded positions per example: what a batch padded to its longest computes for nothing
        return np.mean([np.mean(lengths[b].max() - lengths[b]) for b in batches])

    assert padding(grouped) < 0.1 * padding(plain)
    # The batches of a pass are shuffled: not served longest first.
    means = [lengths[b].mean() for b in grouped]
    assert means != sorted(means, reverse=True) and means != sorted(means)


def test_grouped_batches_are_seeded():
    from fedlora_cli.data.examples import batch_schedule

    lengths = _lengths(300)
    first = batch_schedule(300, 8, 80, np.random.default_rng(9), lengths)
    again = batch_schedule(300, 8, 80, np.random.default_rng(9), lengths)
    other = batch_schedule(300, 8, 80, np.random.default_rng(10), lengths)
    assert [b.tolist() for b in first] == [b.tolist() for b in again]
    assert [b.tolist() for b in first] != [b.tolist() for b in other]


def test_dp_sgd_poisson_sampling_is_never_grouped(make_recipe, partition_dir):
    """The same secret seed gives the very same DP-SGD round with or without training.group_by_length."""
    import dataclasses

    from fedlora_cli.adapters.methods import plan
    from fedlora_cli.data.examples import read_shard
    from fedlora_cli.model.training import DPSettings, local_train

    examples = read_shard(partition_dir / "client-0.parquet", "text", "sentiment", 2)
    results = []
    for grouped in (True, False):
        r = make_recipe("ffa", optimizer="sgd", lr=0.5)
        r = dataclasses.replace(r, training=dataclasses.replace(r.training, group_by_length=grouped))
        bench = build(r, 2)
        dp = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.1, secret_seed=5)
        local_train(bench, plan("ffa", "shared"), examples, seed=0, dp=dp)
        results.append(bench.adapter_tensors())
    assert all(torch.equal(results[0][n], results[1][n]) for n in results[0])
