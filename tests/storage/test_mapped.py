"""fedlora_cli.storage.mapped: a safetensors file as numpy views of its memory map, parsed as strictly as the
safetensors library parses it; anything else is one clear line, never a traceback, never unpickled."""

from __future__ import annotations

import json
import pickle
import struct

import numpy as np
import pytest
from safetensors.numpy import save_file

from fedlora_cli.errors import FedloraError
from fedlora_cli.storage.mapped import empty_like, read_tensors


def tensors() -> dict[str, np.ndarray]:
    return {
        "a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.linspace(-1, 1, 5),  # float64
        "c": np.array(2.5, dtype=np.float16), "d": np.zeros((0, 4), np.float32), "e": np.arange(3, dtype=np.int64),
        "f": np.array([True, False]),
    }


def handmade(path, header: dict, data: bytes, length: int | None = None) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)


def test_reads_every_tensor_safetensors_wrote(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file(tensors(), str(path), metadata={"format": "np"})

    mapped = read_tensors(path, "client update tensors")

    assert set(mapped) == set(tensors())
    for name, a in tensors().items():
        assert mapped[name].dtype == a.dtype and mapped[name].shape == a.shape and np.array_equal(mapped[name], a)


@pytest.mark.parametrize("header, data, length, needle", [
    ({}, b"", 10**12, "does not fit in the file"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, None, "past the end of the data"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4, None, "has 4 bytes for F32[2]"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, None, "a gap or an overlap"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "b": {"dtype": "F32", "shape": [1],
      "data_offsets": [0, 4]}}, b"\0" * 4, None, "a gap or an overlap"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8, None, "4 bytes after the last tensor"),
    ({"a": {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [0, 4]}}, b"\0" * 4, None, "numpy does not hold"),
    ({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, b"\0" * 4, None, "malformed shape"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"\0" * 4, None, "malformed data offsets"),
    ({"a": {"dtype": "F32", "shape": [1]}}, b"\0" * 4, None, "malformed header entry"),
    ([1, 2], b"", None, "not a JSON object"),
])
def test_a_file_that_is_not_safetensors_is_one_line(tmp_path, header, data, length, needle):
    path = tmp_path / "bad.safetensors"
    handmade(path, header, data, length)

    with pytest.raises(FedloraError) as caught:
        read_tensors(path, "client update tensors")

    message = str(caught.value)
    assert message.startswith(f"client update tensors {path} is not a readable safetensors file")
    assert needle in message and "\n" not in message


@pytest.mark.parametrize("content", [b"", b"\x01\x02", b"\x05" + b"\0" * 7 + b"{oops", pickle.dumps({"a": 1})],
                         ids=["empty", "too short", "not JSON", "a pickle"])
def test_garbage_and_pickles_are_refused(tmp_path, content):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)

    with pytest.raises(FedloraError, match="is not a readable safetensors file"):
        read_tensors(path, "client update tensors")


def test_a_missing_file(tmp_path):
    with pytest.raises(FedloraError, match="client update tensors not found"):
        read_tensors(tmp_path / "nowhere.safetensors", "client update tensors")


def test_empty_like_carves_writable_arrays_out_of_one_allocation():
    like = tensors()

    room = empty_like(like)

    assert {n: (a.dtype, a.shape) for n, a in room.items()} == {n: (a.dtype, a.shape) for n, a in like.items()}
    assert all(a.flags.writeable and a.ctypes.data % 64 == room["a"].ctypes.data % 64 for a in room.values())
    assert len({id(a.base) for a in room.values()}) == 1  # one block under all of them
    for name, a in room.items():
        a[...] = like[name]
    assert all(np.array_equal(room[n], like[n]) for n in like)
