"""The inputs the fuzzing found that fedlora did not accept or refuse in one line, each pinned as a test."""

from __future__ import annotations

import io
import json
import math
import struct
import tempfile
from pathlib import Path

import pytest

from fedlora_cli import recipe as recipes, storage
from fedlora_cli.errors import FedloraError
from fedlora_cli.storage import mapped
from . import properties, strategies


def refused(call) -> str:
    with pytest.raises(FedloraError) as caught:
        call()
    message = str(caught.value)
    assert len(message.splitlines()) == 1, message
    return message


@pytest.mark.parametrize("kind", ["global", "update", "state"])
def test_the_valid_manifests_the_fuzzing_starts_from_are_read(tmp_path, kind):
    # Prepare: the property would hold vacuously if its starting point were refused
    document = json.dumps(strategies.valid_manifests()[kind]).encode()
    # Execute, Assert
    assert getattr(properties, f"{kind}_manifest")(document, tmp_path) == "accepted"


@pytest.mark.parametrize("text", ["[" * 5000 + "]" * 5000, '{"round": ' + "9" * 5000 + "}"])
def test_a_manifest_nested_past_the_stack_or_with_a_5000_digit_number_is_refused(tmp_path, text):
    (tmp_path / storage.UPDATE_MANIFEST).write_text(text)
    assert "is not valid JSON" in refused(lambda: storage.read_update(tmp_path))


def test_a_manifest_whose_digests_are_not_text_is_refused(tmp_path):
    manifest = {**strategies.valid_manifests()["update"], "tensor_digests": {"a": 5}}
    (tmp_path / storage.UPDATE_MANIFEST).write_text(json.dumps(manifest))
    assert "'tensor_digests' must be dict[str, str]" in refused(lambda: storage.read_update(tmp_path))


def test_a_manifest_whose_site_record_holds_booleans_and_nulls_is_read(tmp_path):
    # Prepare: 'site' is dict[str, Any]; a first deep type check refused True there (bool is not 'object' enough)
    manifest = {**strategies.valid_manifests()["update"], "site": {"gradient_checkpointing": True, "dtype": None}}
    (tmp_path / storage.UPDATE_MANIFEST).write_text(json.dumps(manifest))
    # Execute, Assert
    assert storage.read_update(tmp_path).manifest.site == {"gradient_checkpointing": True, "dtype": None}


def test_a_manifest_of_a_negative_round_is_refused(tmp_path):
    manifest = {**strategies.valid_manifests()["update"], "round": -1}
    (tmp_path / storage.UPDATE_MANIFEST).write_text(json.dumps(manifest))
    assert "'round' must not be negative" in refused(lambda: storage.read_update(tmp_path))


def test_a_safetensors_header_whose_metadata_is_not_a_mapping_is_refused_as_the_library_refuses_it(tmp_path):
    header = b'{"__metadata__": false}'
    (tmp_path / "u.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    assert "__metadata__" in refused(lambda: mapped.read_layout(tmp_path / "u.safetensors", "client update"))


def test_a_tensor_named_with_a_line_break_is_refused_in_one_line(tmp_path):
    header = json.dumps({"a\nb": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}).encode()
    (tmp_path / "u.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    assert "'a\\nb'" in refused(lambda: mapped.read_layout(tmp_path / "u.safetensors", "client update"))


def test_a_recipe_that_is_not_utf8_or_holds_a_5000_digit_number_is_refused(tmp_path):
    for text in (b"w\xa9&", b"name: x\nmodel: {base: m}\ntraining: {seed: " + b"9" * 5000 + b"}"):
        (tmp_path / "r.yaml").write_bytes(text)
        refused(lambda: recipes.load(tmp_path / "r.yaml"))


@pytest.mark.parametrize("text", ["model: {base: 2026-12-07}", "model: {base: !!binary aGk=}", "1: x\nmodel: {}"])
def test_a_recipe_value_json_cannot_hold_is_refused(tmp_path, text):
    (tmp_path / "r.yaml").write_text(text)
    refused(lambda: recipes.load(tmp_path / "r.yaml"))


def test_a_recipe_whose_aliases_expand_to_ten_million_values_is_refused_before_expanding(tmp_path):
    (tmp_path / "r.yaml").write_text(properties.alias_bomb(7))
    assert "at most 1000000 values" in refused(lambda: recipes.load(tmp_path / "r.yaml"))


def test_a_recipe_float_given_as_a_400_digit_integer_is_refused():
    raw = {**strategies.valid_recipe(), "training": {**strategies.valid_recipe()["training"], "lr": 10**400}}
    assert "too large for a float" in refused(lambda: recipes.from_dict(raw))


def test_a_recipe_value_with_a_line_break_is_refused_in_one_line():
    raw = {**strategies.valid_recipe(), "training": {**strategies.valid_recipe()["training"], "optimizer": ",\n"}}
    refused(lambda: recipes.from_dict(raw))


def test_a_node_config_key_with_a_line_break_is_refused_in_one_line():
    from fedlora_cli.flower.site import SiteConfig

    refused(lambda: SiteConfig.from_node_config({"client-id": "a", "state-dir": "/s", "\r": None}))


@pytest.mark.parametrize("value", ['{"round": ' + "9" * 5000 + "}", "[" * 5000 + "]" * 5000])
def test_a_flower_message_with_json_nested_past_the_stack_or_a_5000_digit_number_is_refused(value):
    pytest.importorskip("flwr")
    from flwr.app import ArrayRecord, ConfigRecord, RecordDict

    from fedlora_cli.flower import transport

    content = RecordDict({"update.files": ArrayRecord({}), "update.text": ConfigRecord({"update.json": value})})
    with tempfile.TemporaryDirectory() as tmp:
        refused(lambda: transport.unpack(content, "update", Path(tmp) / "out"))
        assert not any(Path(tmp).iterdir())


@pytest.mark.parametrize("frame", [b"[" * 5000 + b"\n", b'{"op": ' + b"9" * 5000 + b"}\n"])
def test_a_worker_frame_nested_past_the_stack_or_with_a_5000_digit_number_is_refused(frame):
    from fedlora_cli.flower import channel

    refused(lambda: channel.read_frame(io.BytesIO(frame)))


@pytest.mark.parametrize("header", [b'{"a": ' + b"[" * 5000 + b"]" * 5000 + b"}",
                                    b'{"a": {"dtype": "F32", "shape": [' + b"7" * 5000 + b'], "data_offsets": [0, 4]}}',
                                    b'{"a": {"dtype": {"F32": 1}, "shape": [1], "data_offsets": [0, 4]}}'])
def test_a_safetensors_header_nested_past_the_stack_a_5000_digit_shape_or_a_mapping_dtype_is_refused(tmp_path, header):
    (tmp_path / "u.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(4))
    assert "not a readable safetensors file" in refused(
        lambda: mapped.read_layout(tmp_path / "u.safetensors", "client update"))


def test_a_client_id_ending_in_a_line_break_is_refused():
    assert not storage.valid_client_id("site-a\n")
    assert "'site-a\\n'" in refused(lambda: storage.check_client_id("site-a\n"))


def test_a_worker_query_whose_manifest_is_not_json_is_refused_not_failed(tmp_path):
    from fedlora_cli.flower import channel, site as sites, worker

    lines: list[str] = []
    site = sites.SiteConfig.from_node_config(properties.site_node_config(tmp_path))
    answer = worker.Worker(site, properties.StubBenches(), lines.append).handle(
        {"protocol": channel.PROTOCOL, "op": "query", "node-config": properties.site_node_config(tmp_path),
         "manifest": "None"})
    assert answer == {"error": "the global checkpoint manifest sent is not valid JSON"}
    assert not any(" failed: " in line for line in lines)


def test_a_global_manifest_naming_an_adapter_kind_with_a_line_break_is_refused_in_one_line(tmp_path):
    from fedlora_cli.federation.common import Global

    manifest = {**strategies.valid_manifests()["global"], "adapter_kind": "lora\n"}
    (tmp_path / storage.GLOBAL_MANIFEST).write_text(json.dumps(manifest))
    properties.checkpoint_files(tmp_path)
    assert "'lora\\n'" in refused(lambda: Global.of(tmp_path).plan)


def test_the_worker_answers_a_request_whose_refusal_would_outgrow_a_frame_over_its_socket():
    # Prepare: an op of 300,000 DEL bytes, raw in the JSON as any client may send it, is 1.2 MB once quoted by repr
    import socket

    from fedlora_cli.flower import channel, site as sites, worker

    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        config = properties.site_node_config(Path(tmp))
        frame = (b'{"protocol": ' + str(channel.PROTOCOL).encode() + b', "op": "' + b"\x7f" * 300_000
                 + b'", "node-config": ' + json.dumps(config).encode() + b"}\n")
        service = worker.Service(worker.Worker(sites.SiteConfig.from_node_config(config), properties.StubBenches(),
                                               lambda line: None))
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.connect(str(service.path))
                stream = sock.makefile("rwb")
                # Execute
                stream.write(frame)
                stream.flush()
                answer = channel.read_frame(stream)
                stream.close()
        finally:
            service.close()
    # Assert: the worker's own refusal arrives (before: the handler thread's traceback, and no answer)
    assert answer["error"].startswith("unknown request '\\x7f") and len(answer["error"]) <= 2000


@pytest.mark.parametrize("kind, field, value, needle", [
    ("update", "privacy", {"accountant": "prv", "delta": 1e-5}, "privacy 'epsilon'"),  # the round table's KeyError
    ("update", "privacy", {"accountant": "prv", "delta": 1e-5, "epsilon": "1.2"}, "privacy 'epsilon'"),
    ("global", "server_privacy_ledger", [[1.0]], "server_privacy_ledger"),  # privacy report's unpacking ValueError
    ("state", "privacy", {**strategies.valid_manifests()["state"]["privacy"], "history": [[1.1, 0.01, math.inf]]},
     "privacy 'history'"),  # Ledger.from_dict's OverflowError
])
def test_a_privacy_record_its_readers_cannot_use_is_refused_when_the_manifest_is_read(tmp_path, kind, field, value,
                                                                                        needle):
    document = json.dumps({**strategies.valid_manifests()[kind], field: value})
    name, read = {"global": (storage.GLOBAL_MANIFEST, storage.read_global), "update": (storage.UPDATE_MANIFEST,
                  storage.read_update), "state": ("round-002/" + storage.STATE_MANIFEST, storage.latest_state)}[kind]
    (tmp_path / name).parent.mkdir(exist_ok=True)
    (tmp_path / name).write_text(document)
    properties.checkpoint_files(tmp_path)
    assert needle in refused(lambda: read(tmp_path))


@pytest.mark.parametrize("sigma, expected", [(1e-300, math.inf), (1e300, 0.0)])
def test_the_privacy_report_of_a_server_ledger_with_an_absurd_noise_multiplier_is_a_number(tmp_path, sigma, expected):
    # Prepare: sigma**2 underflowed to 0 (ZeroDivisionError) or overflowed (OverflowError) in the exact composition
    from fedlora_cli.privacy.report import server_entry

    manifest = {**strategies.valid_manifests()["global"], "server_privacy_ledger": [[sigma, 1.0, 1]]}
    (tmp_path / storage.GLOBAL_MANIFEST).write_text(json.dumps(manifest))
    properties.checkpoint_files(tmp_path)
    # Execute, Assert
    assert server_entry(tmp_path)["epsilon"] == expected


def test_the_exact_composition_of_a_noise_multiplier_of_1e_minus_100_is_about_half_its_inverse_square():
    # Prepare: probing e^eps Phi(...) past 1e308 raised OverflowError (mu = 1e100); the answer is about mu^2 / 2
    from fedlora_cli.privacy.accounting import GAUSSIAN, epsilon

    # Execute, Assert
    assert epsilon([(1e-100, 1.0, 1)], 1e-5, GAUSSIAN) == pytest.approx(5e199, rel=1e-6)
