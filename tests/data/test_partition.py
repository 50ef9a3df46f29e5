"""fedlora_cli.data.partition: partition strategies: seeded, disjoint, complete, and skewed as asked; with and
without labels."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from fedlora_cli import recipe as recipes
from fedlora_cli.data import partition
from fedlora_cli.data.examples import read_examples
from fedlora_cli.errors import FedloraError


def test_iid_is_disjoint_complete_and_balanced():
    parts = partition.iid(103, 4, np.random.default_rng(0))
    joined = np.concatenate(parts)
    assert sorted(joined.tolist()) == list(range(103))
    assert {len(p) for p in parts} <= {25, 26}


def skew(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean total-variation distance between each client's label distribution and the global one."""
    classes = labels.max() + 1
    overall = np.bincount(labels, minlength=classes) / len(labels)
    return float(np.mean([0.5 * np.abs(np.bincount(labels[p], minlength=classes) / len(p) - overall).sum() for p in parts]))


def test_dirichlet_is_seeded_and_skewed():
    labels = np.repeat(np.arange(10), 200)
    a = partition.dirichlet(labels, 5, 0.1, np.random.default_rng(3))
    b = partition.dirichlet(labels, 5, 0.1, np.random.default_rng(3))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert sorted(np.concatenate(a).tolist()) == list(range(2000))
    near_iid = partition.dirichlet(labels, 5, 1000.0, np.random.default_rng(3))
    assert skew(labels, a) > 0.4  # alpha 0.1: severe skew
    assert skew(labels, near_iid) < 0.1  # alpha 1000: about IID (sampling noise alone is ~0.06)
    assert skew(labels, partition.iid(2000, 5, np.random.default_rng(3))) < 0.1


def test_dirichlet_gives_up_with_a_clear_error():
    with pytest.raises(FedloraError, match="at least"):
        partition.dirichlet(np.repeat([0, 1], 10), 8, 0.01, np.random.default_rng(0), min_examples=10)


def test_natural_groups_by_value():
    keys, parts = partition.natural(np.asarray(["b", "a", "b", "c"]))
    assert keys == ["a", "b", "c"]
    assert [p.tolist() for p in parts] == [[1], [0, 2], [3]]


def spec(source, **kw) -> recipes.DataSection:
    raw = {"model": {"base": "m"}, "data": {"source": str(source), "label_column": "sentiment", **kw}}
    return recipes.from_dict(raw).data


def test_partition_writes_shards_and_manifest(tmp_path, reviews_csv):
    result = partition.partition(spec(reviews_csv, strategy="dirichlet", alpha=0.5, labels=["neg", "pos"]), 3, tmp_path / "p")
    m = result.manifest
    assert m["label_names"] == ["neg", "pos"]
    assert m["strategy"] == "dirichlet" and m["alpha"] == 0.5 and m["seed"] == 0
    total = m["test"]["examples"] + m["validation"]["examples"] + sum(c["examples"] for c in m["clients"])
    assert total == 400
    assert m["test"]["examples"] == 80 and m["validation"]["examples"] == 40  # the default fractions 0.2, 0.1
    for c in m["clients"]:
        shard = pd.read_parquet(tmp_path / "p" / c["file"])
        assert len(shard) == c["examples"]
        assert np.bincount(shard["sentiment"], minlength=2).tolist() == c["label_counts"]
    test = pd.read_parquet(tmp_path / "p" / partition.TEST_SHARD)
    validation = pd.read_parquet(tmp_path / "p" / partition.VALIDATION_SHARD)
    shards = pd.concat([pd.read_parquet(tmp_path / "p" / c["file"]) for c in m["clients"]])
    assert len(test) + len(validation) + len(shards) == 400
    assert np.bincount(validation["sentiment"], minlength=2).tolist() == m["validation"]["label_counts"]


def test_the_validation_split_is_disjoint_from_test_and_clients_and_leaves_the_test_split_as_it_was(tmp_path,
                                                                                                  reviews_csv):
    with_validation = partition.partition(spec(reviews_csv, strategy="iid", validation_fraction=0.25), 3, tmp_path / "v")
    without = partition.partition(spec(reviews_csv, strategy="iid", validation_fraction=0), 3, tmp_path / "n")
    texts = {name: set(pd.read_parquet(tmp_path / "v" / f"{name}.parquet")["text"]) for name in ("test", "validation")}
    clients = set(pd.concat([pd.read_parquet(tmp_path / "v" / c["file"]) for c in with_validation.manifest["clients"]])["text"])
    assert not texts["test"] & texts["validation"] and not clients & (texts["test"] | texts["validation"])
    assert with_validation.manifest["validation"]["examples"] == 100 and without.manifest["validation"] is None
    assert not (tmp_path / "n" / partition.VALIDATION_SHARD).exists()
    # The validation rows come out of the training rows: the same seed holds out the same test split either way.
    assert pd.read_parquet(tmp_path / "v" / "test.parquet").equals(pd.read_parquet(tmp_path / "n" / "test.parquet"))


@pytest.mark.parametrize("fractions, message", [
    ({"validation_fraction": -0.1}, r"data\.validation_fraction.*at least 0"),
    ({"validation_fraction": 1.0}, r"data\.validation_fraction.*below 1"),
    ({"validation_fraction": 0.5, "test_fraction": 0.5}, r"data\.validation_fraction.*sum below 1"),
])
def test_a_validation_fraction_that_leaves_nothing_to_train_on_is_refused(reviews_csv, fractions, message):
    with pytest.raises(FedloraError, match=message):
        spec(reviews_csv, **fractions)


def test_partition_is_reproducible(tmp_path, reviews_csv):
    a = partition.partition(spec(reviews_csv, strategy="dirichlet"), 3, tmp_path / "a").manifest
    b = partition.partition(spec(reviews_csv, strategy="dirichlet"), 3, tmp_path / "b").manifest
    c = partition.partition(spec(reviews_csv, strategy="dirichlet", seed=1), 3, tmp_path / "c").manifest
    assert a["clients"] == b["clients"]
    assert a["clients"] != c["clients"]
    for f in ("client-0.parquet", "test.parquet"):
        assert pd.read_parquet(tmp_path / "a" / f).equals(pd.read_parquet(tmp_path / "b" / f))


def test_label_filter_and_order(tmp_path, reviews_csv):
    m = partition.partition(spec(reviews_csv, labels=["pos", "neg"]), 2, tmp_path / "p").manifest
    assert m["label_names"] == ["pos", "neg"]
    with pytest.raises(FedloraError, match="meh"):
        partition.partition(spec(reviews_csv, labels=["pos", "meh"]), 2, tmp_path / "q")


def test_natural_partition_by_column(tmp_path, reviews_csv):
    m = partition.partition(spec(reviews_csv, strategy="natural", by="site"), 99, tmp_path / "p").manifest
    assert [c["value"] for c in m["clients"]] == ["s0", "s1", "s2"]


@pytest.mark.parametrize("suffix", ["jsonl", "parquet", "saved"])
def test_other_sources(tmp_path, reviews_csv, suffix):
    frame = pd.read_csv(reviews_csv)
    if suffix == "jsonl":
        source = tmp_path / "r.jsonl"
        frame.to_json(source, orient="records", lines=True)
    elif suffix == "parquet":
        source = tmp_path / "r.parquet"
        frame.to_parquet(source)
    else:
        import datasets

        source = tmp_path / "saved"
        datasets.DatasetDict({"train": datasets.Dataset.from_pandas(frame)}).save_to_disk(str(source))
    m = partition.partition(spec(source), 2, tmp_path / "p").manifest
    assert sum(c["examples"] for c in m["clients"]) + m["test"]["examples"] + m["validation"]["examples"] == 400


def test_partitions_without_labels(make_causal_recipe, tmp_path):
    r = make_causal_recipe()
    data = r.data
    plain = dataclasses.replace(data, strategy="iid", by=None)
    iid = partition.partition(plain, 3, tmp_path / "iid", task="causal-lm")
    assert iid.manifest["task"] == "causal-lm" and iid.manifest["label_names"] == [] and iid.manifest["label_column"] is None
    assert sum(c["examples"] for c in iid.manifest["clients"]) + iid.manifest["validation"]["examples"] == 120
    # With a category column, any strategy counts its values per client, as labels are counted.
    counted = partition.partition(dataclasses.replace(data, strategy="iid"), 3, tmp_path / "iid2", task="causal-lm")
    assert counted.manifest["label_names"] == ["add", "mul", "sub"] and counted.manifest["label_column"] == "category"
    natural = partition.partition(dataclasses.replace(data, strategy="natural"), 3, tmp_path / "nat", task="causal-lm")
    assert [c["value"] for c in natural.manifest["clients"]] == ["add", "mul", "sub"]
    assert all(sum(1 for n in c["label_counts"] if n) == 1 for c in natural.manifest["clients"])
    sized = partition.partition(dataclasses.replace(data, strategy="size", sizes=[0.6, 0.3, 0.1],
                                                    validation_fraction=0), 3, tmp_path / "size", task="causal-lm")
    assert [c["examples"] for c in sized.manifest["clients"]] == [72, 36, 12]
    drawn = partition.partition(dataclasses.replace(data, strategy="size", alpha=1.0), 3, tmp_path / "drawn",
                                task="causal-lm")
    assert len({c["examples"] for c in drawn.manifest["clients"]}) > 1
    shard = read_examples(tmp_path / "size" / "client-2.parquet", data, "causal-lm", None)
    assert len(shard) == 12 and shard.answers is not None and shard.chat_template


def test_by_size_honours_proportions_and_refuses_an_empty_client():
    rng = np.random.default_rng(0)
    parts = partition.by_size(10, 3, rng, [0.5, 0.25, 0.25])
    assert [len(p) for p in parts] == [5, 3, 2] or [len(p) for p in parts] == [5, 2, 3]
    assert sorted(np.concatenate(parts).tolist()) == list(range(10))
    with pytest.raises(FedloraError, match="without an example"):
        partition.by_size(10, 3, rng, [0.98, 0.01, 0.01])
