"""Folders into Flower records and back: byte-exact (bfloat16 too, and through Flower's own wire encoding), only
safetensors and JSON files, every bad entry refused before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("flwr")

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from safetensors.torch import save_file

from fedlora_cli.errors import FedloraError
from fedlora_cli.flower import transport


def make_folder(path: Path) -> Path:
    path.mkdir()
    save_file({"a": torch.randn(3, 4, dtype=torch.bfloat16), "b": torch.arange(5, dtype=torch.int64)},
              str(path / "update.safetensors"))
    (path / "update.json").write_text(json.dumps({"client_id": "site-a", "loss": None}, indent=2) + "\n")
    return path


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def over_the_wire(content: RecordDict) -> RecordDict:
    """The RecordDict as the other side inflates it from Flower's serialised objects."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

    contents = {oid: obj.deflate() for oid, obj in get_all_nested_objects(content).items()}
    return inflate_object_from_contents(content.object_id, contents)


def test_a_folder_arrives_byte_exact_through_flowers_encoding(tmp_path):
    # Prepare
    folder = make_folder(tmp_path / "update")
    # Execute
    content = over_the_wire(RecordDict(transport.pack(folder, "update")))
    out = transport.unpack(content, "update", tmp_path / "received")
    # Assert: every file bit for bit, bfloat16 included
    assert files_of(out) == files_of(folder)
    assert json.loads(transport.text_of(content, "update", "update.json"))["client_id"] == "site-a"
    sizes = sum(len(b) for b in files_of(folder).values())
    # Each array carries numpy's .npy header (128 bytes) on top of the file's bytes.
    assert sizes <= transport.wire_bytes(content, "update") <= sizes + 128


@pytest.mark.parametrize("name, data", [
    ("model.pt", b"\x80\x04pickle"),
    ("notes.txt", b"hello"),
    (".hidden.json", b"{}"),
])
def test_pack_refuses_anything_but_safetensors_and_json(tmp_path, name, data):
    folder = make_folder(tmp_path / "update")
    (folder / name).write_bytes(data)
    with pytest.raises(FedloraError, match="travel|plain file name"):
        transport.pack(folder, "update")


def test_pack_refuses_a_subfolder_and_a_fake_safetensors_file(tmp_path):
    folder = make_folder(tmp_path / "update")
    (folder / "sub").mkdir()
    with pytest.raises(FedloraError, match="'sub' is not a file"):
        transport.pack(folder, "update")
    (folder / "sub").rmdir()
    (folder / "update.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(FedloraError, match="not a safetensors file"):
        transport.pack(folder, "update")


def _content(folder: Path) -> RecordDict:
    return RecordDict(transport.pack(folder, "update"))


BAD_ENTRIES = {
    "a path that climbs out": lambda c: c["update.files"].__setitem__("../x.safetensors", c["update.files"]["update.safetensors"]),
    "a pickle as an array": lambda c: c["update.files"].__setitem__("m.pt", Array(np.zeros(3, np.uint8))),
    "a float array": lambda c: c["update.files"].__setitem__("u.safetensors", Array(np.zeros(3, np.float32))),
    "a 2-D array": lambda c: c["update.files"].__setitem__("u.safetensors", Array(np.zeros((2, 2), np.uint8))),
    "bytes that are not safetensors": lambda c: c["update.files"].__setitem__(
        "update.safetensors", Array(np.frombuffer(b"\x10" * 40, np.uint8))),
    "a manifest that is not JSON": lambda c: c["update.text"].__setitem__("update.json", "{not json"),
    "a manifest that is a list": lambda c: c["update.text"].__setitem__("update.json", "[1]"),
    "JSON as an array": lambda c: c["update.files"].__setitem__("x.json", Array(np.zeros(3, np.uint8))),
    "safetensors as text": lambda c: c["update.text"].__setitem__("x.safetensors", "{}"),
}


@pytest.mark.parametrize("case", list(BAD_ENTRIES))
def test_unpack_refuses_a_bad_entry_and_writes_nothing(tmp_path, case):
    content = _content(make_folder(tmp_path / "update"))
    BAD_ENTRIES[case](content)
    with pytest.raises(FedloraError):
        transport.unpack(content, "update", tmp_path / "received")
    assert not (tmp_path / "received").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["update"]  # no temporary folder left behind


def test_unpack_refuses_a_message_without_the_folder(tmp_path):
    with pytest.raises(FedloraError, match="missing from the message"):
        transport.unpack(RecordDict({"other": ConfigRecord({})}), "update", tmp_path / "out")
    with pytest.raises(FedloraError, match="holds no files"):
        transport.unpack(RecordDict({"update.files": ArrayRecord(), "update.text": ConfigRecord()}), "update",
                         tmp_path / "out")
