"""Files written whole or not at all, JSON, safetensors, and digests of tensors.

Every file and folder fedlora writes goes through :func:`atomic_dir` or :func:`atomic_file`: a temporary sibling
renamed into place, so an interrupted or failed command leaves either the complete output or nothing.
Tensors are read and written only as safetensors: nothing a client sends is ever unpickled.

Every tensor of a global checkpoint, a client update and a client state has a digest in its folder's manifest
(:func:`tensor_digest`); a global checkpoint's and a client update's are checked whenever their tensors are
read (:func:`load_verified`). The digest protects against accidents: a file corrupted or truncated in transit or on disk, a tensor file swapped for another
one, a file changed between two reads. It does not protect against a malicious client: a client writes its
own manifest, so it can send any tensors with matching digests. That is what the norm bound and the robust
strategies are for (:mod:`fedlora_cli.aggregation`).

The algorithm is xxh3-128 (:data:`DIGEST_ALGORITHM`), a checksum made for this job, and every new digest
names it (``xxh128:<32 hex digits>``). Digests fedlora wrote before it, bare sha256 hex, still verify: each
recorded digest is checked with the algorithm it names (:func:`digest_matches`), so a checkpoint, update or
run folder written then still loads, verifies and resumes. The identity of a global checkpoint
(:func:`global_digest`, which client updates carry as ``parent_digest``) and the frozen digest stay sha256 of
the per-tensor digest strings: a few kilobytes, whose hash costs nothing; they are recorded when a
checkpoint is written and only ever compared, never recomputed from the tensors, so an identity never
changes once written.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedlora_cli.errors import FedloraError, first_line

if TYPE_CHECKING:
    import numpy as np
    import torch


@contextlib.contextmanager
def atomic_dir(final: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``final``; on success rename it to ``final``, on failure remove it. A temporary
    sibling that a process killed mid-write left (its PID no longer runs here) is removed first."""
    final = Path(final)
    if final.exists() and not overwrite:
        raise FedloraError(f"{final} already exists (pass --overwrite to replace it)")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    _remove_abandoned(final.parent, f".{final.name}.tmp-", "")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        _refuse_if_no_room(exc, final)
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
    _remove_abandoned(final.parent, f".{final.stem}.tmp-", final.suffix)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        _refuse_if_no_room(exc, final)
        raise


def _remove_abandoned(folder: Path, prefix: str, suffix: str) -> None:
    """Remove the temporary siblings (``PREFIX<pid>SUFFIX``) that a process killed mid-write left in ``folder``: those
    whose process no longer runs. A writer that still runs (another process writing the same output) is left alone."""
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        name = entry.name
        if not (name.startswith(prefix) and name.endswith(suffix)):
            continue
        pid = name[len(prefix):len(name) - len(suffix)]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists, owned by another user
        return True
    return True


# A write that failed for want of room: the disk full, a quota, a file-size limit (RLIMIT_FSIZE).
_NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _refuse_if_no_room(exc: BaseException, final: Path) -> None:
    """Turn a failed write for want of room into one line (the partial output is already removed); safetensors'
    writer reports it as a SafetensorError whose message ends '(os error N)' rather than as an OSError."""
    code = exc.errno if isinstance(exc, OSError) else None
    if code is None and exc.__class__.__name__ == "SafetensorError":
        found = re.search(r"\(os error (\d+)\)", str(exc))
        code = int(found[1]) if found else None
    if code in _NO_ROOM:
        raise FedloraError(f"could not write {final}: {os.strerror(code)} (the disk is full or a file-size or quota "
                           "limit was reached); nothing written: free some space and run it again") from None


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise FedloraError(f"{what} not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (ValueError, RecursionError):  # also an integer of thousands of digits, or nesting past the stack
        raise FedloraError(f"{what} {path} is not valid JSON") from None
    if not isinstance(data, dict):
        raise FedloraError(f"{what} {path} is not a JSON object")
    return data


def save_tensors(path: Path, tensors: Mapping[str, torch.Tensor] | Mapping[str, np.ndarray]) -> int:
    """Write tensors (torch tensors, or numpy arrays: the same file either way, a :data:`.mapped.BF16` array as
    bfloat16) as safetensors; returns the file size in bytes."""
    if is_arrays(tensors):
        _save_arrays(path, tensors)
    else:
        from safetensors.torch import save_file

        save_file({name: t.detach().contiguous().cpu() for name, t in tensors.items()}, str(path))
    return path.stat().st_size


def _save_arrays(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """safetensors.numpy.save_file, but naming each dtype as :func:`.mapped.dtype_name` does (numpy has no
    bfloat16 of its own)."""
    import numpy as np
    import safetensors

    from fedlora_cli.storage.mapped import dtype_name

    held = {name: np.ascontiguousarray(a) for name, a in arrays.items()}
    if hasattr(safetensors, "TensorSpec"):  # safetensors >= 0.8 takes the arrays' memory as it is
        specs = {name: safetensors.TensorSpec(dtype=dtype_name(a), shape=a.shape, data_ptr=a.ctypes.data,
                                              data_len=a.nbytes) for name, a in held.items()}
    else:
        specs = {name: {"dtype": dtype_name(a), "shape": a.shape, "data": a.tobytes()} for name, a in held.items()}
    safetensors.serialize_file(specs, str(path), metadata=None)


def is_arrays(tensors: Mapping[str, Any]) -> bool:
    """Whether a dict of tensors holds numpy arrays (the coordinator's) rather than torch tensors; an empty dict
    holds neither and counts as torch."""
    import numpy as np

    return any(isinstance(t, np.ndarray) for t in tensors.values())


def as_arrays(tensors: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """CPU torch tensors as numpy arrays over the same memory (bfloat16 as :data:`.mapped.BF16` arrays of its
    bits): no copy, and no second digest check."""
    import torch

    from fedlora_cli.storage.mapped import BF16

    def array(t: torch.Tensor) -> np.ndarray:
        t = t.detach().cpu()
        return t.view(torch.int16).numpy().view(BF16) if t.dtype == torch.bfloat16 else t.numpy()

    return {name: array(t) for name, t in tensors.items()}


def as_tensors(arrays: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Numpy arrays as torch tensors over the same memory (a :data:`.mapped.BF16` array as bfloat16): no copy,
    and no second digest check."""
    if not arrays:
        return {}
    import numpy as np
    import torch

    from fedlora_cli.storage.mapped import is_bf16

    return {name: torch.from_numpy(a.view(np.int16)).view(torch.bfloat16) if is_bf16(a) else torch.from_numpy(a)
            for name, a in arrays.items()}


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
                raise FedloraError(f"{what} {path} has no tensor {name!r}")
            return handle.get_tensor(name)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise FedloraError(f"{what} {path} is not a readable safetensors file ({first_line(exc)})") from None


def tensor_header(path: Path, what: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Names (sorted), dtypes and shapes from a safetensors header, without reading the data: parsed and checked
    by the coordinator's one reader (:func:`.mapped.read_layout`)."""
    from fedlora_cli.storage.mapped import read_layout

    entries = read_layout(path, what).entries
    return {name: entries[name][:2] for name in sorted(entries)}


# The digest choice, in one place. Every tensor's digest: xxh3-128 (the xxhash package), not BLAKE3 or sha256.
# A checksum is all the job needs (a cryptographic hash buys nothing: whoever could forge a digest writes the
# manifest anyway, see the module docstring), and xxh3 is the faster of the two made for speed: on a 67 MB
# float32 tensor on this project's 2-core machine, 9.8 GB/s against BLAKE3's 2.6 GB/s on one thread (2.9 GB/s on
# both cores) and sha256's 0.74 GB/s (benchmarks/digest.py, results/RESULTS.md, 2026-12-01). The coordinator
# hashes on one thread while another averages, so BLAKE3's multi-threading would only compete with the
# averaging. Both have wheels for Linux (x86-64, aarch64; glibc and musl), macOS (x86-64, arm64) and Windows;
# xxhash releases the GIL while it hashes (since 3.0) and is already installed with `datasets`. XXH3's output
# is frozen since xxHash 0.8.0 (python-xxhash 2.0), so a digest written today verifies with any later version.
DIGEST_ALGORITHM = "xxh128"
# The digest of a set of digests (a global checkpoint's identity, the frozen digest): a few kilobytes of
# digest strings, so its speed does not matter; it stays sha256, bare hex, as identities always were.
IDENTITY_ALGORITHM = "sha256"
# A digest without a prefix is sha256: every tensor digest fedlora wrote before xxh128. Read, never written.
_BARE_ALGORITHM = "sha256"
KNOWN_ALGORITHMS = ("xxh128", "sha256")
_BARE_DIGEST = re.compile(r"[0-9a-f]{64}")
_PREFIX = re.compile(r"[a-z][a-z0-9_-]{0,15}")


def _hasher(algorithm: str) -> Any:
    if algorithm == "xxh128":
        import xxhash

        return xxhash.xxh3_128()
    if algorithm == "sha256":
        return hashlib.sha256()
    raise ValueError(f"unknown digest algorithm '{algorithm}'")


_TORCH_NAMES: dict[Any, str] = {}


def _hex_digest(tensor: torch.Tensor | np.ndarray, algorithm: str) -> str:
    import numpy as np

    if isinstance(tensor, np.ndarray):
        # Named as torch names the dtype ('torch.float32'), so an array and the tensor of the same bytes have one
        # digest, whichever library read them. (Kept per dtype: numpy works out a dtype's name anew each time. A
        # bfloat16 array equals uint16 as a dtype, so it is looked up by its name, not by the dtype.)
        dtype = _TORCH_NAMES.get(tensor.dtype) if tensor.dtype.metadata is None else None
        if dtype is None:
            from fedlora_cli.storage.mapped import dtype_name

            dtype = f"torch.{dtype_name(tensor)}"
            if tensor.dtype.metadata is None:
                _TORCH_NAMES[tensor.dtype] = dtype
        shape = tuple(tensor.shape)
        data = np.ascontiguousarray(tensor).reshape(-1).view(np.uint8)  # no copy for a contiguous array
    else:
        import torch

        t = tensor.detach().contiguous().cpu()  # no copy for a contiguous CPU tensor
        dtype, shape, data = t.dtype, tuple(t.shape), t.reshape(-1).view(torch.uint8).numpy()
    h = _hasher(algorithm)
    h.update(f"{dtype}|{shape}|".encode())
    h.update(memoryview(data))  # the tensor's own buffer, hashed in place
    return h.hexdigest()


def tensor_digest(tensor: torch.Tensor | np.ndarray, algorithm: str | None = None) -> str:
    """The digest of a tensor's dtype, shape and raw bytes, named by its algorithm (default
    :data:`DIGEST_ALGORITHM`): ``xxh128:<32 hex digits>``. Equal digests mean bit-identical tensors; a numpy array
    has the digest of the torch tensor with the same dtype, shape and bytes."""
    algorithm = algorithm or DIGEST_ALGORITHM
    return f"{algorithm}:{_hex_digest(tensor, algorithm)}"


def digest_algorithm(digest: str, where: str = "a manifest") -> str:
    """The algorithm a recorded digest names (``xxh128:<hex>``; bare hex is sha256, from before xxh128).

    A digest of an algorithm this fedlora does not know (a newer fedlora's?), or of no recognisable form, is a
    :class:`FedloraError` that says ``where`` it was found.
    """
    return _parse_digest(digest, where)[0]


def _parse_digest(digest: str, where: str) -> tuple[str, str]:
    if isinstance(digest, str):
        if _BARE_DIGEST.fullmatch(digest):
            return _BARE_ALGORITHM, digest
        prefix, sep, value = digest.partition(":")
        if sep and prefix in KNOWN_ALGORITHMS and value:
            return prefix, value
        if sep and _PREFIX.fullmatch(prefix) and prefix not in KNOWN_ALGORITHMS:
            raise FedloraError(
                f"{where} has a digest of unknown algorithm '{prefix}' (this fedlora reads "
                f"{', '.join(KNOWN_ALGORITHMS)}): was it written by a newer fedlora?"
            )
    raise FedloraError(f"{where} has a malformed digest {str(digest)!r:.40} (expected '{DIGEST_ALGORITHM}:<hex>')")


def digest_matches(tensor: torch.Tensor | np.ndarray, expected: str, where: str = "a manifest") -> bool:
    """Whether a tensor is the one a recorded digest describes, hashed with the algorithm that digest names (so
    a digest written before xxh128 still checks)."""
    algorithm, value = _parse_digest(expected, where)
    return _hex_digest(tensor, algorithm) == value


def check_digest(tensor: torch.Tensor | np.ndarray, expected: str, where: str) -> None:
    """Refuse a tensor that is not the one its recorded digest describes: a :class:`FedloraError` that says
    ``where`` it was read (a file and a tensor name)."""
    if not digest_matches(tensor, expected, where):
        raise FedloraError(
            f"{where} does not match the digest in its manifest (the file was corrupted, truncated or replaced "
            "since it was written)"
        )


def load_verified(path: Path, digests: Mapping[str, str], what: str, framework: str = "pt") -> dict[str, Any]:
    """Read a safetensors file and check it against the digests its manifest records for it: the same tensor
    names, and every tensor bit-identical to the one written, each checked with the algorithm its digest
    names. Each tensor is hashed as it is read, while its bytes are still in the CPU's cache, rather than in a
    second pass over the whole file. ``framework`` is "pt" (torch tensors, the default) or "numpy" (arrays,
    without torch: read into one allocation, which costs far fewer page faults than one allocation per tensor,
    as safetensors' numpy reader makes; never memory-mapped, see :func:`.mapped.read_tensors`).

    A missing, truncated, corrupted or swapped file is a :class:`FedloraError` that names the tensor.
    """
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise FedloraError(f"{what} not found: {path}")
    for name, d in digests.items():  # an unknown or malformed digest is refused before any data is read
        _parse_digest(d, f"{what} {path}: tensor {name!r}")
    if framework == "numpy":
        from fedlora_cli.storage.mapped import read_layout

        layout = read_layout(path, what)
        _check_names(layout.entries, digests, f"{what} {path}")
        tensors = layout.read_all(what)
        for name, t in tensors.items():
            check_digest(t, digests[name], f"{what} {path}: tensor {name!r}")
        return tensors
    tensors = {}
    try:
        with safe_open(str(path), framework=framework) as handle:
            names = list(handle.keys())
            _check_names(names, digests, f"{what} {path}")
            for name in names:
                t = handle.get_tensor(name)
                check_digest(t, digests[name], f"{what} {path}: tensor {name!r}")
                tensors[name] = t
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise FedloraError(f"{what} {path} is not a readable safetensors file ({first_line(exc)})") from None
    return tensors


def _check_names(names: Iterable[str], digests: Mapping[str, str], where: str) -> None:
    """A file must hold exactly the tensors its manifest has digests for."""
    unrecorded, absent = sorted(set(names) - set(digests)), sorted(set(digests) - set(names))
    if unrecorded:
        raise FedloraError(f"{where} holds tensor {unrecorded[0]!r}, which has no digest in its manifest")
    if absent:
        raise FedloraError(f"{where} lacks tensor {absent[0]!r}, which its manifest has a digest for")


def combined_digest(digests: Mapping[str, str]) -> str:
    """One digest for a set of named tensors, independent of dict order: sha256 of the names and their digest
    strings (whatever algorithm each names), as bare hex."""
    h = _hasher(IDENTITY_ALGORITHM)
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
