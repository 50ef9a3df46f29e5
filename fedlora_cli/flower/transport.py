"""fedlora's folders as Flower records, byte-exact: a global checkpoint or a client update travels as it is on disk.

A folder becomes two records of a message's RecordDict, named after what it is (``global``, ``update``)::

    NAME.files   ArrayRecord: each safetensors file, its bytes as one 1-D uint8 Array (file name -> Array)
    NAME.text    ConfigRecord: each JSON file (the manifest, the adapter config), its text (file name -> str)

Why not Flower's own tensors: an ArrayRecord of torch tensors refuses bfloat16 and would re-encode what fedlora's
digests already pin; bytes arrive exactly as written, and the reader on the other side (``storage.read_update``,
``storage.read_global`` and the digests in their manifests) checks them as it checks any folder. Only
safetensors and JSON files travel, under plain file names; anything else is refused on both sides, and nothing
is unpickled (Flower's own Array decoding runs ``np.load`` with ``allow_pickle=False``).
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import TYPE_CHECKING

from fedlora_cli.errors import FedloraError
from fedlora_cli.storage.files import atomic_dir

if TYPE_CHECKING:
    from flwr.app import RecordDict

TENSOR_SUFFIX = ".safetensors"
TEXT_SUFFIX = ".json"
FILES = "files"
TEXT = "text"
# A plain file name: no folders, no hidden files, nothing a path could climb out of the folder with.
_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
# safetensors' own limit on its JSON header (100 MB): a larger length prefix is no safetensors file.
_MAX_HEADER = 100_000_000


def record_names(name: str) -> tuple[str, str]:
    """The RecordDict keys a folder called ``name`` travels under: (safetensors files, JSON files)."""
    return f"{name}.{FILES}", f"{name}.{TEXT}"


def _kind(file_name: str, where: str) -> str:
    if not _FILE_NAME.match(file_name) or ".." in file_name:
        raise FedloraError(f"{where}: {file_name!r} is not a plain file name; refused")
    if file_name.endswith(TENSOR_SUFFIX):
        return FILES
    if file_name.endswith(TEXT_SUFFIX):
        return TEXT
    raise FedloraError(f"{where}: {file_name!r} is neither a safetensors nor a JSON file; only those travel")


def _check_safetensors(data: bytes, where: str) -> None:
    """The 8-byte header length and a JSON object header: the shape of a safetensors file, checked before it
    is written (the tensors themselves are checked against the manifest's digests by whoever reads it)."""
    if len(data) < 8:
        raise FedloraError(f"{where} is not a safetensors file (shorter than its header)")
    (size,) = struct.unpack("<Q", data[:8])
    if size > _MAX_HEADER or 8 + size > len(data):
        raise FedloraError(f"{where} is not a safetensors file (header length {size} out of range)")
    try:
        header = json.loads(data[8:8 + size])
    except (ValueError, RecursionError):  # also an integer of thousands of digits, or nesting past the stack
        raise FedloraError(f"{where} is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise FedloraError(f"{where} is not a safetensors file (its header is not a JSON object)")


def _check_json(text: str, where: str) -> None:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        raise FedloraError(f"{where} is not valid JSON") from None
    if not isinstance(value, dict):
        raise FedloraError(f"{where} is not a JSON object")


def pack(folder: Path, name: str) -> dict[str, object]:
    """The records carrying ``folder`` (its safetensors and JSON files; anything else is refused), to put in a
    message's RecordDict."""
    import numpy as np
    from flwr.app import Array, ArrayRecord, ConfigRecord

    folder = Path(folder)
    if not folder.is_dir():
        raise FedloraError(f"{folder} is not a folder; nothing to send")
    arrays: dict[str, Array] = {}
    text: dict[str, str] = {}
    for path in sorted(folder.iterdir()):
        where = f"{folder}"
        if not path.is_file():
            raise FedloraError(f"{where}: {path.name!r} is not a file; only safetensors and JSON files travel")
        if _kind(path.name, where) == FILES:
            data = path.read_bytes()
            _check_safetensors(data, f"{path}")
            arrays[path.name] = Array(np.frombuffer(data, dtype=np.uint8))
        else:
            content = path.read_text()
            _check_json(content, f"{path}")
            text[path.name] = content
    files_key, text_key = record_names(name)
    return {files_key: ArrayRecord(arrays), text_key: ConfigRecord(text)}


def unpack(content: RecordDict, name: str, out: Path, overwrite: bool = False) -> Path:
    """Write the folder ``name`` a message carries to ``out`` (whole or not at all); returns ``out``.

    Every entry is checked before anything is written: plain safetensors/JSON file names, each safetensors file
    one 1-D uint8 array of its exact length with a safetensors header, each JSON file a JSON object.
    """
    from flwr.app import Array, ArrayRecord, ConfigRecord

    files_key, text_key = record_names(name)
    where = f"the {name} sent"
    arrays, text = content.get(files_key), content.get(text_key)
    if not isinstance(arrays, ArrayRecord) or not isinstance(text, ConfigRecord):
        raise FedloraError(f"{where} is missing from the message (no '{files_key}' and '{text_key}' records)")
    files: dict[str, bytes | str] = {}
    for file_name, array in arrays.items():
        if _kind(file_name, where) != FILES:
            raise FedloraError(f"{where}: {file_name!r} came as an array; only safetensors files do")
        if not isinstance(array, Array) or array.dtype != "uint8" or len(array.shape) != 1:
            raise FedloraError(f"{where}: {file_name!r} is not one 1-D uint8 array of file bytes")
        data = array.numpy().tobytes()
        if len(data) != array.shape[0]:
            raise FedloraError(f"{where}: {file_name!r} holds {len(data)} bytes, its array says {array.shape[0]}")
        _check_safetensors(data, f"{where}: {file_name!r}")
        files[file_name] = data
    for file_name, value in text.items():
        if _kind(file_name, where) != TEXT:
            raise FedloraError(f"{where}: {file_name!r} came as text; only JSON files do")
        if not isinstance(value, str):
            raise FedloraError(f"{where}: {file_name!r} is not text")
        _check_json(value, f"{where}: {file_name!r}")
        files[file_name] = value
    if not files:
        raise FedloraError(f"{where} holds no files")
    with atomic_dir(Path(out), overwrite=overwrite) as tmp:
        for file_name, data in files.items():
            if isinstance(data, bytes):
                (tmp / file_name).write_bytes(data)
            else:
                (tmp / file_name).write_text(data)
    return Path(out)


def text_of(content: RecordDict, name: str, file_name: str) -> str:
    """One JSON file's text from the folder ``name`` a message carries (a manifest, read without the tensors)."""
    from flwr.app import ConfigRecord

    text = content.get(record_names(name)[1])
    value = text.get(file_name) if isinstance(text, ConfigRecord) else None
    if not isinstance(value, str):
        raise FedloraError(f"the {name} sent carries no {file_name}")
    _check_json(value, f"the {name} sent: {file_name!r}")
    return value


def wire_bytes(content: RecordDict, name: str) -> int:
    """The payload bytes the folder ``name`` takes in a message: every Array's encoded data plus the JSON text
    (Flower's own framing and metadata come on top)."""
    files_key, text_key = record_names(name)
    arrays, text = content.get(files_key), content.get(text_key)
    total = sum(len(a.data) for a in arrays.values()) if arrays is not None else 0
    return total + (sum(len(str(v).encode()) for v in text.values()) if text is not None else 0)
