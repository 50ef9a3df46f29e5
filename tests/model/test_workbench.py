"""fedlora_cli.model.workbench: building a workbench leaves the process's global state as it found it, initialises
the adapter exactly as fedlora always has for the same seed, and callers read it with another recipe through a view
that shares its model."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import warnings

import pytest
import torch

from fedlora_cli.errors import FedloraError
from fedlora_cli.model.training import local_train
from fedlora_cli.model.workbench import build

# sha256 over every adapter tensor (name, dtype, shape, bytes; by name) of a workbench built by fedlora before
# build() stopped seeding the global generator (commit 5743242, torch 2.13 on the CPU), on conftest's tiny BERT
# (BertConfig, seed 1234): a fixed point computed from the old code, not from the code under test. A different init
# would make the round-0 digests recorded in old run folders unreachable, and those folders would no longer resume.
OLD_INIT = {
    ("lora", "ffa", 0): "c467afd5c6681106fcbc377bcb898210bfd677848ae887317c07402484265df0",
    ("lora", "ffa", 7): "889a3d7f7e8077cc4d1a1b51455cfe780c0abca0ae41e74016161bbbb09850fd",
    ("vera", "fedavg", 0): "902b738d44a5e7e24e38e2844f73a93771e535d3f58c896f8f932336e7c3fae6",
}


def digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def global_state() -> dict:
    from transformers.utils import logging as hf_logging

    return {
        "cpu generator": torch.random.get_rng_state(),
        "threads": torch.get_num_threads(),
        "default dtype": torch.get_default_dtype(),
        "grad enabled": torch.is_grad_enabled(),
        "transformers verbosity": hf_logging.get_verbosity(),
        "transformers progress bars": hf_logging.is_progress_bar_enabled(),
        "transformers logger level": logging.getLogger("transformers").level,
        "warning filters": list(warnings.filters),
    }


def assert_same_state(before: dict, after: dict) -> None:
    for key, value in before.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(after[key], value), f"{key} changed"
        else:
            assert after[key] == value, f"{key} changed: {value!r} -> {after[key]!r}"


@pytest.fixture
def unusual_state():
    """Global settings no build would choose (so that one which sets its own shows), put back afterwards."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        hf_logging.set_verbosity_info()
        hf_logging.enable_progress_bar()
        torch.manual_seed(99)
        yield
        hf_logging.set_verbosity(verbosity)
        if not bars:
            hf_logging.disable_progress_bar()


def test_building_a_workbench_leaves_global_state_as_it_found_it(make_recipe, unusual_state):
    before = global_state()
    expected_draw = torch.rand(4, generator=torch.Generator().set_state(before["cpu generator"]))

    build(make_recipe("ffa"), 2)

    assert_same_state(before, global_state())
    assert torch.equal(torch.rand(4), expected_draw), "the next random draw is not the one it would have been"


def test_local_training_leaves_global_state_as_it_found_it(make_recipe, partition_dir, unusual_state):
    from fedlora_cli.adapters.methods import plan
    from fedlora_cli.data.examples import read_shard

    bench = build(make_recipe("ffa"), 2)
    examples = read_shard(partition_dir / "client-0.parquet", "text", "sentiment", 2)
    before = global_state()

    local_train(bench, plan("ffa", "shared"), examples, seed=3)

    assert_same_state(before, global_state())


@pytest.mark.parametrize(("kind", "method", "seed"), sorted(OLD_INIT))
def test_the_adapter_is_initialised_as_before_for_the_same_seed(kind, method, seed, kind_recipe):
    recipe = kind_recipe(kind, method, **({"r": 16} if kind == "vera" else {}))
    recipe = dataclasses.replace(recipe, training=dataclasses.replace(recipe.training, seed=seed))
    torch.manual_seed(12345)  # whatever the global generator holds, the init is the seed's

    assert digest(build(recipe, 2).adapter_tensors()) == OLD_INIT[(kind, method, seed)]


def test_the_same_seed_builds_the_same_adapter_whatever_ran_before(make_recipe):
    first = build(make_recipe("ffa"), 2).adapter_tensors()
    torch.rand(1000)
    second = build(make_recipe("ffa"), 2).adapter_tensors()
    other = build(make_recipe("ffa", seed=1), 2).adapter_tensors()

    assert first.keys() == second.keys()
    for name, t in first.items():
        assert torch.equal(second[name], t), name
    assert any(not torch.equal(other[name], t) for name, t in first.items() if "lora_A" in name)


def test_a_workbench_is_read_with_another_recipe_through_a_view_sharing_its_model(make_recipe):
    bench = build(make_recipe("ffa"), 2)
    other = make_recipe("ffa", lr=0.5)

    view = bench.for_recipe(other)

    assert view.recipe is other and bench.recipe.training.lr == 0.01
    assert view.model is bench.model and view.tokenizer is bench.tokenizer
    assert view._base_weights is bench._base_weights  # a correction applied through one is seen by the other
    with pytest.raises(dataclasses.FrozenInstanceError):
        bench.recipe = other  # type: ignore[misc]


def test_a_view_refuses_a_recipe_for_another_model(make_recipe, kind_recipe):
    bench = build(make_recipe("ffa"), 2)
    with pytest.raises(FedloraError, match="built for a sequence-classification model with a lora adapter"):
        bench.for_recipe(kind_recipe("vera", "ffa", r=16))
    recipe = make_recipe("ffa")
    causal = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, task="causal-lm"))
    with pytest.raises(FedloraError, match="causal-lm model"):
        bench.for_recipe(causal)
