"""Files written whole or not at all, JSON, safetensors, and digests of tensors.

Every file and folder fedlora writes goes through :func:`atomic_dir` or :func:`atomic_file`: a temporary sibling
renamed into place, so an interrupted or failed command leaves either the complete output or nothing.
Tensors are read and written only as safetensors: nothing a client sends is ever unpickled.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedlora_cli.errors import FedloraError, first_line

if TYPE_CHECKING:
    import torch


@contextlib.contextmanager
def atomic_dir(final: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``final``; on success rename it to ``final``, on failure remove it."""
    final = Path(final)
    if final.exists() and not overwrite:
        raise FedloraError(f"{final} already exists (pass --overwrite to replace it)")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        trash = final.parent / f".{final.name}.old-{os.getpid()}"
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)


@contextlib.contextmanager
def atomic_file(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling of the file ``final`` (same suffix); on success rename it to ``final``, on
    failure remove it. Readers see the old file or the new one, never half of one."""
    final = Path(final)
    tmp = final.with_name(f".{final.stem}.tmp-{os.getpid()}{final.suffix}")
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise FedloraError(f"{what} not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise FedloraError(f"{what} {path} is not valid JSON") from None
    if not isinstance(data, dict):
        raise FedloraError(f"{what} {path} is not a JSON object")
    return data


def save_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> int:
    """Write tensors as safetensors; returns the file size in bytes."""
    from safetensors.torch import save_file

    save_file({name: t.detach().contiguous().cpu() for name, t in tensors.items()}, str(path))
    return path.stat().st_size


def load_tensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    """Read a safetensors file; a missing, truncated or corrupted file is a :class:`FedloraError`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise FedloraError(f"{what} not found: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise FedloraError(f"{what} {path} is not a readable safetensors file ({first_line(exc)})") from None


def read_tensor(path: Path, name: str, what: str) -> torch.Tensor:
    """One tensor of a safetensors file, without reading the others."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise FedloraError(f"{what} not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            if name not in handle.keys():
                raise FedloraError(f"{what} {path} has no tensor '{name}'")
            return handle.get_tensor(name)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise FedloraError(f"{what} {path} is not a readable safetensors file ({first_line(exc)})") from None


def tensor_header(path: Path, what: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Names, dtypes and shapes from a safetensors header, without reading the data."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise FedloraError(f"{what} not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = {}
            for name in handle.keys():
                piece = handle.get_slice(name)
                header[name] = (str(piece.get_dtype()), tuple(piece.get_shape()))
            return header
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise FedloraError(f"{what} {path} is not a readable safetensors file ({first_line(exc)})") from None


def tensor_digest(tensor: torch.Tensor) -> str:
    """sha256 of dtype, shape and raw bytes: equal digests mean bit-identical tensors."""
    import torch

    t = tensor.detach().contiguous().cpu()
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))  # hashes in place, no copy
    return h.hexdigest()


def combined_digest(digests: Mapping[str, str]) -> str:
    """One digest for a set of named tensors, independent of dict order."""
    h = hashlib.sha256()
    for name in sorted(digests):
        h.update(f"{name}={digests[name]};".encode())
    return h.hexdigest()


def global_digest(
    tensor_digests: Mapping[str, str], correction_digests: Mapping[str, str] | None = None,
    server_state_digests: Mapping[str, str] | None = None,
) -> str:
    """The identity of a global checkpoint: its adapter tensors, its base-weight correction and its server
    optimiser state, if any (a checkpoint with neither has the digest of its tensors alone, as always)."""
    extra = {f"correction:{layer}": d for layer, d in (correction_digests or {}).items()}
    state = {f"server:{name}": d for name, d in (server_state_digests or {}).items()}
    return combined_digest({**tensor_digests, **extra, **state})
