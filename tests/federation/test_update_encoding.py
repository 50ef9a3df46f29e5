"""federation.update_encoding (issue 26, item 4): client updates sent as the bfloat16 or blockwise int8 difference from
the received global, with error feedback in the client state, decoded exactly by the coordinator's one reader."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file
from conftest import private_recipe
from typer.testing import CliRunner

from fedlora_cli import recipe as recipes, storage
from fedlora_cli.cli import app
from fedlora_cli.errors import FedloraError
from fedlora_cli.federation import client as client_module
from fedlora_cli.federation.server import aggregate_round
from fedlora_cli.storage import encoding as encodings
from fedlora_cli.storage.mapped import read_layout

CLIENTS = ["client-0", "client-1", "client-2"]


def update_paths(layout, round_=1):
    return [layout.update(round_, c) for c in CLIENTS]


def tensor_bytes(layout, round_=1):
    """The bytes of the round's update tensors, their safetensors headers left out: on the tiny model the JSON
    header (names, shapes) is about as large as the tensors, and a real adapter's tensors dwarf it."""
    layouts = [read_layout(p / storage.UPDATE_TENSORS, "update") for p in update_paths(layout, round_)]
    return sum(lay.path.stat().st_size - lay.start for lay in layouts)


def global_tensors(path):
    return load_file(str(path / storage.ADAPTER_WEIGHTS))


# ---- the codec, on hand-made arrays ----------------------------------------------------------------------------

@pytest.mark.parametrize("size, magnitude", [(1, 1.0), (255, 1e-3), (256, 10.0), (1000, 1e-6), (4097, 3.0)])
def test_int8_round_trip_errs_by_at_most_half_a_scale_per_value(size, magnitude):
    delta = (np.random.default_rng(size).standard_normal(size) * magnitude).astype(np.float32).reshape(size, 1)

    stored = encodings.encode("w", delta, "int8")
    decoded = encodings.decode("w", stored, "int8")

    scale = stored["w::scale"]
    assert stored["w::q"].dtype == np.int8 and stored["w::q"].shape == delta.shape
    assert scale.dtype == np.float32 and scale.shape == (-(-size // encodings.BLOCK),)
    per_value = np.repeat(scale, encodings.BLOCK)[:size].reshape(delta.shape)
    assert np.all(np.abs(decoded - delta) <= per_value / 2 * (1 + 1e-6))
    assert np.abs(stored["w::q"]).max() == 127  # each block's largest value takes the largest code


def test_a_block_of_zeros_decodes_to_zeros():
    stored = encodings.encode("w", np.zeros((3, 100), np.float32), "int8")

    assert not encodings.decode("w", stored, "int8").any()
    assert not stored["w::scale"].any()


def test_bfloat16_keeps_the_delta_to_bfloat16_precision():
    delta = np.array([1.0, 1.0 + 2**-9, 3e-5, -2.5], np.float32)

    decoded = encodings.decode("w", encodings.encode("w", delta, "bfloat16"), "bfloat16")

    np.testing.assert_array_equal(decoded[[0, 1, 3]], [1.0, 1.0, -2.5])  # 1 + 2^-9 is nearer 1 than 1 + 2^-7
    assert np.all(np.abs(decoded - delta) <= np.abs(delta) * 2**-8)


def test_error_feedback_sums_the_true_deltas_up_to_the_last_residual():
    """Scale 1 (absmax 127), so the codes are the rounded values and the residuals are the rounding errors:
    round 1 sends [127, 0, -0, 0] and keeps [0, 0.4, -0.3, 0]; round 2 encodes [127, 0.8, -0.6, 0] -> [127, 1, -1, 0]
    and keeps [0, -0.2, 0.4, 0]; round 3 encodes [127, 0.2, 0.1, 0] -> [127, 0, 0, 0] and keeps [0, 0.2, 0.1, 0]."""
    true = np.array([127.0, 0.4, -0.3, 0.0], np.float32)
    carried, sent = np.zeros(4, np.float32), []
    for _ in range(3):
        stored, residuals = encodings.encode_update({"w": true + carried}, "int8")
        sent.append(encodings.decode("w", stored, "int8"))
        carried = residuals["w"]

    np.testing.assert_array_equal(sent, [[127, 0, 0, 0], [127, 1, -1, 0], [127, 0, 0, 0]])
    np.testing.assert_allclose(carried, [0, 0.2, 0.1, 0], atol=1e-6)
    np.testing.assert_allclose(np.sum(sent, axis=0) + carried, 3 * true, atol=1e-5)


# ---- federations ------------------------------------------------------------------------------------------------

@pytest.fixture
def encoded(strategy_recipe, cached_federation):
    """The cached finished tiny federation (2 rounds, 3 clients) with its updates in ``encoding``."""
    return lambda encoding="int8": cached_federation(strategy_recipe(update_encoding=encoding))


def test_the_default_recipe_digest_is_unchanged_and_an_encoding_changes_it(strategy_recipe):
    plain = strategy_recipe()

    assert strategy_recipe(update_encoding="float32").digest() == plain.digest()
    assert strategy_recipe(update_encoding="int8").digest() != plain.digest()


# int8: a quarter, plus a float32 scale per block of 256 (per tensor, on the tiny model's small ones).
@pytest.mark.parametrize("encoding, low, high", [("int8", 0.25, 0.3), ("bfloat16", 0.5, 0.52)])
def test_an_encoded_federation_uploads_a_fraction_of_float32_and_aggregates(encoding, low, high, encoded):
    plain, layout = encoded("float32"), encoded(encoding)

    for round_ in (1, 2):
        assert low <= tensor_bytes(layout, round_) / tensor_bytes(plain, round_) < high
        manifest = json.loads((layout.update(round_, "client-0") / storage.UPDATE_MANIFEST).read_text())
        assert manifest["encoding"] == encoding and manifest["bytes"] == (
            layout.update(round_, "client-0") / storage.UPDATE_TENSORS).stat().st_size
    assert storage.read_global(layout.global_checkpoint(2)).manifest.round == 2
    names = set(read_layout(layout.update(1, "client-0") / storage.UPDATE_TENSORS, "update").entries)
    assert names and all("::" in n for n in names)


def test_the_float32_default_writes_the_tensors_as_they_are(encoded):
    layout = encoded("float32")

    names = set(load_file(str(layout.update(1, "client-0") / storage.UPDATE_TENSORS)))
    assert names and not any("::" in n for n in names)
    state = storage.latest_state(layout.state("client-0"))
    assert not any(encodings.is_residual(n) for n in state.tensors())


def decoded_update(layout, round_, client_id):
    """A client update decoded by hand: the global it trained from plus codes x scales."""
    received = global_tensors(layout.global_checkpoint(round_ - 1))
    stored = load_file(str(layout.update(round_, client_id) / storage.UPDATE_TENSORS))
    return {name: received[name] + encodings.decode(name, stored, "int8")
            for name in encodings.sent_names(stored, "int8")}


def test_by_hand_aggregate_of_int8_updates_gives_simulates_global(encoded, tmp_path):
    layout = encoded()

    result = aggregate_round(layout.global_checkpoint(0), update_paths(layout), tmp_path / "g1")

    expected = global_tensors(layout.global_checkpoint(1))
    got = global_tensors(tmp_path / "g1")
    assert set(got) == set(expected) and all(np.array_equal(got[n], expected[n]) for n in expected)
    sizes = {row.client_id: row.bytes for row in result.clients}
    assert sizes == {c: (layout.update(1, c) / storage.UPDATE_TENSORS).stat().st_size for c in CLIENTS}


def test_the_median_reads_back_the_decoded_tensors(encoded, tmp_path):
    """The layer-wise strategies read each tensor back by name: decoded there too, to the same values."""
    layout = encoded()

    aggregate_round(layout.global_checkpoint(0), update_paths(layout), tmp_path / "g1", strategy="median")

    decoded = [decoded_update(layout, 1, c) for c in CLIENTS]
    got = global_tensors(tmp_path / "g1")
    for name in decoded[0]:
        np.testing.assert_array_equal(got[name], np.median(np.stack([d[name] for d in decoded]), axis=0))


def test_the_client_state_keeps_the_rounding_error_and_adds_it_next_round(
        strategy_recipe, run_federation, monkeypatch):
    calls = []
    real = client_module._encoded

    def spy(g, sent, carried, rank, encoding):
        stored, residuals = real(g, sent, carried, rank, encoding)
        calls.append(({n: t.detach().numpy().copy() for n, t in sent.items()},
                      {n: t.numpy().copy() for n, t in carried.items()}, stored,
                      {n: t.numpy() for n, t in residuals.items()}))
        return stored, residuals

    monkeypatch.setattr(client_module, "_encoded", spy)
    recipe = strategy_recipe(update_encoding="int8")
    layout = run_federation(recipe)

    assert len(calls) == 6 and not calls[0][1]  # round 1 carries nothing
    first, second = calls[0], calls[3]  # client-0's rounds (clients train in order)
    kept = {n: t.numpy() for n, t in storage.latest_state(layout.state("client-0"), before_round=2).tensors().items()}
    assert {encodings.residual_name(n) for n in first[0]} <= set(kept)
    for name in first[0]:
        np.testing.assert_array_equal(kept[encodings.residual_name(name)], first[3][encodings.residual_name(name)])
        np.testing.assert_array_equal(second[1][name], kept[encodings.residual_name(name)])
        # What round 2 sent, decoded, plus its residual is its trained tensor less what it received plus round 1's error.
        received = global_tensors(layout.global_checkpoint(1))[name]
        decoded = encodings.decode(name, second[2], "int8")
        np.testing.assert_allclose(decoded + second[3][encodings.residual_name(name)],
                                   second[0][name] - received + second[1][name], atol=1e-6)


def test_a_tampered_code_tensor_fails_its_digest(encoded, tmp_path):
    layout = encoded()
    paths = [shutil.copytree(p, tmp_path / p.name) for p in update_paths(layout)]
    tensors = paths[0] / storage.UPDATE_TENSORS
    file_layout = read_layout(tensors, "update")
    name = next(n for n in file_layout.entries if n.endswith("::q"))
    _, _, begin, _ = file_layout.entries[name]
    data = bytearray(tensors.read_bytes())
    data[file_layout.start + begin] ^= 0x01
    tensors.write_bytes(bytes(data))

    with pytest.raises(FedloraError, match="does not match the digest|changed while aggregating"):
        aggregate_round(layout.global_checkpoint(0), paths, tmp_path / "g1")
    with pytest.raises(FedloraError, match="does not match the digest|changed while aggregating"):
        aggregate_round(layout.global_checkpoint(0), paths, tmp_path / "g1", strategy="median")
    assert not (tmp_path / "g1").exists()


def test_an_update_of_another_encoding_is_refused_in_one_line(encoded, tmp_path):
    layout = encoded()
    paths = [shutil.copytree(p, tmp_path / p.name) for p in update_paths(layout)]
    manifest_path = paths[1] / storage.UPDATE_MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["encoding"] = "bfloat16"
    manifest_path.write_text(json.dumps(manifest))

    result = CliRunner().invoke(app, ["aggregate", str(layout.global_checkpoint(0)), *map(str, paths),
                                      "--out", str(tmp_path / "g1")])

    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    text = " ".join(result.output.split())
    assert len([line for line in lines if "error:" in line]) == 1, result.output
    assert "is encoded 'bfloat16'; the federation's recipe sends 'int8'" in text
    assert not (tmp_path / "g1").exists()


def test_a_float32_update_is_refused_by_an_int8_federation(encoded, tmp_path):
    paths = update_paths(encoded("float32"))

    with pytest.raises(FedloraError, match="is encoded 'float32'; the federation's recipe sends 'int8'"):
        aggregate_round(encoded().global_checkpoint(0), paths, tmp_path / "g1")


def test_old_float32_updates_without_the_field_still_aggregate(encoded, tmp_path):
    layout = encoded("float32")
    paths = [shutil.copytree(p, tmp_path / p.name) for p in update_paths(layout)]
    for path in paths:
        manifest = json.loads((path / storage.UPDATE_MANIFEST).read_text())
        del manifest["encoding"]
        (path / storage.UPDATE_MANIFEST).write_text(json.dumps(manifest))

    aggregate_round(layout.global_checkpoint(0), paths, tmp_path / "g1")

    expected, got = global_tensors(layout.global_checkpoint(1)), global_tensors(tmp_path / "g1")
    assert all(np.array_equal(got[n], expected[n]) for n in expected)


@pytest.mark.parametrize("options", [[], ["--strategy", "median"], ["--norm-bound", "0.001"]],
                         ids=["mean", "median", "clip"])
def test_int8_updates_aggregate_without_torch(options, encoded, tmp_path):
    from .test_coordinator_imports import aggregate_in_a_fresh_process

    layout = encoded()

    result = aggregate_in_a_fresh_process(layout, tmp_path / "g1", *options)

    assert result["round"] == 1
    if not options:
        expected, got = global_tensors(layout.global_checkpoint(1)), global_tensors(tmp_path / "g1")
        assert all(np.array_equal(got[n], expected[n]) for n in expected)


def test_a_dp_sgd_update_is_encoded_after_its_noise_and_spends_what_float32_spends(
        tiny_model_dir, reviews_csv, cached_federation):
    """Encoding is post-processing of the noised update: the ledgers are the float32 run's, round by round."""
    def run(encoding):
        raw = private_recipe(tiny_model_dir, reviews_csv, noise_multiplier=1.0)
        raw["federation"]["update_encoding"] = encoding
        return cached_federation(recipes.from_dict(raw))

    plain, layout = run("float32"), run("int8")

    for round_ in (1, 2):
        for c in CLIENTS:
            encoded = storage.read_update(layout.update(round_, c)).manifest
            assert encoded.encoding == "int8" and encoded.loss is None
            assert encoded.privacy == storage.read_update(plain.update(round_, c)).manifest.privacy


def test_a_client_of_a_lower_rank_encodes_its_difference_from_the_truncated_global(strategy_recipe, cached_federation,
                                                                                  tmp_path):
    """svd with client ranks: a rank-2 client received the global cut to rank 2 and rescaled; its codes have its rank's
    shape, and the coordinator decodes them onto the same truncated global."""
    layout = cached_federation(strategy_recipe(client_ranks={"client-1": 2}, aggregation="svd",
                                               update_encoding="int8"))

    stored = read_layout(layout.update(1, "client-1") / storage.UPDATE_TENSORS, "update").entries
    assert any(name.endswith("lora_A.weight::q") and shape[0] == 2 for name, (_, shape, _, _) in stored.items())
    aggregate_round(layout.global_checkpoint(1), update_paths(layout, 2), tmp_path / "g2")
    expected, got = global_tensors(layout.global_checkpoint(2)), global_tensors(tmp_path / "g2")
    assert all(np.array_equal(got[n], expected[n]) for n in expected)


def test_dp_fedavg_and_a_server_optimiser_take_int8_updates_without_torch(strategy_recipe, federation_copy, tmp_path):
    from .test_coordinator_imports import DP, aggregate_in_a_fresh_process

    layout = federation_copy(strategy_recipe(update_encoding="int8", server_optimizer="fedadam"))

    result = aggregate_in_a_fresh_process(layout, tmp_path / "g1", *DP)

    manifest = json.loads((tmp_path / "g1" / storage.GLOBAL_MANIFEST).read_text())
    assert result["round"] == 1 and result["server_epsilon"] > 0 and manifest["server_state_digests"]
