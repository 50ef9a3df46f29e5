"""Every reader of what other sites and people write accepts the input or refuses it in one line (a FedloraError):
no other exception, no hang, nothing written but its output. The CI budget is small; benchmarks/fuzz.py runs the
same properties with many more inputs."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

pytest.importorskip("flwr")

from . import properties  # noqa: E402

PROPERTIES = properties.PROPERTIES()
CI = settings(max_examples=100, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])


def holds(name: str, example: object) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        assert properties.PROPERTIES_BY_NAME[name](example, Path(tmp)) in ("accepted", "refused")


@CI
@given(PROPERTIES["global manifest"][0])
def test_a_global_checkpoint_manifest_is_read_or_refused_in_one_line(document):
    holds("global manifest", document)


@CI
@given(PROPERTIES["update manifest"][0])
def test_a_client_update_manifest_is_read_or_refused_in_one_line(document):
    holds("update manifest", document)


@CI
@given(PROPERTIES["state manifest"][0])
def test_a_client_state_manifest_is_read_or_refused_in_one_line(document):
    holds("state manifest", document)


@settings(CI, max_examples=150)
@given(PROPERTIES["safetensors (storage.mapped)"][0])
def test_the_coordinators_safetensors_parser_reads_what_the_library_reads_or_refuses_in_one_line(data):
    holds("safetensors (storage.mapped)", data)


@settings(CI, max_examples=150)
@given(PROPERTIES["safetensors (library)"][0])
def test_the_safetensors_library_readers_read_or_refuse_in_one_line(data):
    holds("safetensors (library)", data)


@settings(CI, max_examples=150)
@given(PROPERTIES["transport records"][0])
def test_a_flower_message_is_unpacked_whole_or_refused_with_nothing_written(entries):
    holds("transport records", entries)


@settings(CI, max_examples=150)
@given(PROPERTIES["recipe YAML"][0])
def test_a_recipe_file_is_loaded_or_refused_in_one_line(text):
    holds("recipe YAML", text)


@CI
@given(PROPERTIES["recipe mapping"][0])
def test_a_recipe_mapping_is_validated_or_refused_in_one_line(raw):
    holds("recipe mapping", raw)


@settings(CI, max_examples=150)
@given(PROPERTIES["node config"][0])
def test_a_node_config_is_a_site_or_refused_in_one_line(config):
    holds("node config", config)


@CI
@given(PROPERTIES["worker frame"][0])
def test_a_frame_on_the_worker_socket_is_a_request_or_refused_in_one_line(data):
    holds("worker frame", data)


@settings(CI, max_examples=150)
@given(PROPERTIES["worker request"][0])
def test_the_site_worker_answers_every_request_in_one_line_without_an_internal_error(request_):
    holds("worker request", request_)
