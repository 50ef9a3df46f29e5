"""On-disk formats: global checkpoints, client updates and client state.

Three kinds of folder travel between the coordinator and the sites::

    global checkpoint   written by init/aggregate, read by every client. A folder vanilla PEFT loads
                        (adapter_config.json + adapter_model.safetensors) plus fedlora.json; after an
                        ``exact`` aggregation also correction.safetensors, the dense per-layer residual
                        added to the base weights (vanilla PEFT does not know it: export with --merge).
    client update       written by train-client, read by aggregate: only the tensors the method sends
                        (update.safetensors) plus update.json.
    client state        the client's private folder, never sent: one round-NNN/ sub-folder per trained round
                        holding the tensors that stay home (local.safetensors) plus state.json.

and one file stays with the coordinator:

    coordinator ledger  dp-fedavg-ledger-<recipe digest>.json beside the global checkpoints: every DP-FedAvg
                        release the coordinator has made, including a round aggregated twice (ServerLedger).

Tensors are read and written only as safetensors: nothing a client sends is ever unpickled. Every folder is
written to a temporary sibling and renamed into place, so an interrupted or failed command leaves either
the complete folder or nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterator, Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedlora_cli.errors import FedloraError

if TYPE_CHECKING:
    import torch

FORMAT_VERSION = 1

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
GLOBAL_MANIFEST = "fedlora.json"
CORRECTION_TENSORS = "correction.safetensors"
UPDATE_TENSORS = "update.safetensors"
UPDATE_MANIFEST = "update.json"
STATE_TENSORS = "local.safetensors"
STATE_MANIFEST = "state.json"

_CLIENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def valid_client_id(client_id: str) -> bool:
    return bool(_CLIENT_ID.match(client_id))


def check_client_id(client_id: str) -> str:
    if not valid_client_id(client_id):
        raise FedloraError(
            f"client id '{client_id}' must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return client_id


def round_dirname(round_: int) -> str:
    return f"round-{round_:03d}"


# --------------------------------------------------------------------------------------------------------
# Atomic folders and JSON


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


# --------------------------------------------------------------------------------------------------------
# Tensors


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
        raise FedloraError(f"{what} {path} is not a readable safetensors file ({_first_line(exc)})") from None


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
        raise FedloraError(f"{what} {path} is not a readable safetensors file ({_first_line(exc)})") from None


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
        raise FedloraError(f"{what} {path} is not a readable safetensors file ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else exc.__class__.__name__


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


def global_digest(tensor_digests: Mapping[str, str], correction_digests: Mapping[str, str] | None = None) -> str:
    """The identity of a global checkpoint: its adapter tensors and its base-weight correction, if any."""
    extra = {f"correction:{layer}": d for layer, d in (correction_digests or {}).items()}
    return combined_digest({**tensor_digests, **extra})


# --------------------------------------------------------------------------------------------------------
# Manifests


def _from_dict(cls: type, data: dict[str, Any], path: Path, what: str) -> Any:
    names = {f.name for f in fields(cls)}
    missing = [f.name for f in fields(cls) if f.name not in data and f.default is MISSING and f.default_factory is MISSING]
    if data.get("format_version") != FORMAT_VERSION:
        raise FedloraError(
            f"{what} {path} has format version {data.get('format_version')!r}; this fedlora reads {FORMAT_VERSION}"
        )
    if missing:
        raise FedloraError(f"{what} {path} is missing field(s): {', '.join(missing)}")
    for f in fields(cls):
        if f.name in data and not _has_type(data[f.name], str(f.type)):
            raise FedloraError(f"{what} {path}: field '{f.name}' must be {f.type}; got {data[f.name]!r:.60}")
    return cls(**{k: v for k, v in data.items() if k in names})


_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "dict": (dict,), "list": (list,),
    "Any": (object,),
}


def _has_type(value: Any, annotation: str) -> bool:
    """Whether a JSON value fits a manifest field's annotation (``int``, ``str | None``, ``dict[str, str]``...).

    Manifests come from other sites: a count that is a string, a bool or NaN must be refused by name, not
    crash later or poison an average.
    """
    for option in annotation.split("|"):
        option = option.strip()
        if option == "None":
            if value is None:
                return True
            continue
        kinds = _JSON_TYPES.get(option.split("[", 1)[0], (object,))
        if isinstance(value, bool) and bool not in kinds:
            continue
        if isinstance(value, kinds):
            return True
    return False


@dataclass
class GlobalManifest:
    """fedlora.json beside a global checkpoint's PEFT files."""

    round: int
    method: str
    head: str
    adapter_kind: str
    base_model: str
    base_fingerprint: str
    recipe: dict[str, Any]
    recipe_digest: str
    seed: int
    num_labels: int | None  # None for a causal LM
    tensor_digests: dict[str, str]
    digest: str
    frozen_digest: str | None
    label_names: list[str] | None = None
    clients: list[str] = field(default_factory=list)
    # DP-FedAvg spending at the coordinator: [noise multiplier, sample rate, steps] per aggregated round.
    server_privacy_ledger: list[list[float]] = field(default_factory=list)
    # The delta that ledger's epsilon is stated at (the last DP-FedAvg round's).
    server_privacy_delta: float | None = None
    # Digests of correction.safetensors' tensors (layer -> digest): present after an 'exact' aggregation.
    correction_digests: dict[str, str] = field(default_factory=dict)
    # How the round that wrote this checkpoint aggregated: strategy, norm bound, clipped and rejected clients,
    # and for svd/exact the per-layer error plain averaging would have made (see aggregation.LayerReport).
    aggregation: dict[str, Any] | None = None
    created: float = field(default_factory=time.time)
    format_version: int = FORMAT_VERSION


@dataclass
class UpdateManifest:
    """update.json beside a client update's tensors."""

    client_id: str
    round: int
    parent_digest: str
    method: str
    recipe_digest: str
    base_fingerprint: str
    frozen_digest: str | None
    num_examples: int
    shard_examples: int
    steps: int
    # Mean training loss of the round; None under DP-SGD, where it would release un-noised information about the
    # client's data that no accountant covers (the client keeps it in its state).
    loss: float | None
    seconds: float
    bytes: int
    tensor_digests: dict[str, str]
    # Cumulative DP-SGD spending after this round (epsilon, delta, budget, remaining), if the recipe has privacy.
    privacy: dict[str, Any] | None = None
    format_version: int = FORMAT_VERSION


@dataclass
class StateManifest:
    """state.json in one round of a client's private state."""

    client_id: str
    round: int
    parent_digest: str
    recipe_digest: str
    tensor_digests: dict[str, str]
    # The client's privacy ledger (see fedlora_cli.privacy.Ledger), carried from round to round.
    privacy: dict[str, Any] | None = None
    loss: float | None = None  # this round's mean training loss, kept at home (the update omits it under DP)
    format_version: int = FORMAT_VERSION


@dataclass
class GlobalCheckpoint:
    path: Path
    manifest: GlobalManifest

    @property
    def weights_path(self) -> Path:
        return self.path / ADAPTER_WEIGHTS

    def tensors(self) -> dict[str, torch.Tensor]:
        return load_tensors(self.weights_path, "global checkpoint weights")

    def correction(self) -> dict[str, torch.Tensor]:
        """The dense per-layer base-weight correction of ``exact`` aggregation; empty if there is none."""
        if not self.manifest.correction_digests:
            return {}
        return load_tensors(self.path / CORRECTION_TENSORS, "global checkpoint correction")


def read_global(path: Path) -> GlobalCheckpoint:
    path = Path(path)
    if not path.is_dir():
        raise FedloraError(f"global checkpoint not found: {path}")
    data = read_json(path / GLOBAL_MANIFEST, "global checkpoint manifest")
    manifest = _from_dict(GlobalManifest, data, path / GLOBAL_MANIFEST, "global checkpoint manifest")
    if not (path / ADAPTER_CONFIG).is_file():
        raise FedloraError(f"global checkpoint {path} has no {ADAPTER_CONFIG}")
    return GlobalCheckpoint(path, manifest)


def write_global(
    final: Path, manifest: GlobalManifest, tensors: Mapping[str, torch.Tensor], adapter_config: dict[str, Any],
    overwrite: bool = False, correction: Mapping[str, torch.Tensor] | None = None,
) -> GlobalCheckpoint:
    with atomic_dir(final, overwrite=overwrite) as tmp:
        save_tensors(tmp / ADAPTER_WEIGHTS, tensors)
        if correction:
            save_tensors(tmp / CORRECTION_TENSORS, correction)
        write_json(tmp / ADAPTER_CONFIG, adapter_config)
        write_json(tmp / GLOBAL_MANIFEST, asdict(manifest))
    return GlobalCheckpoint(Path(final), manifest)


@dataclass
class ClientUpdate:
    path: Path
    manifest: UpdateManifest

    @property
    def tensors_path(self) -> Path:
        return self.path / UPDATE_TENSORS


def read_update(path: Path) -> ClientUpdate:
    path = Path(path)
    if not path.is_dir():
        raise FedloraError(f"client update not found: {path}")
    data = read_json(path / UPDATE_MANIFEST, "client update manifest")
    manifest = _from_dict(UpdateManifest, data, path / UPDATE_MANIFEST, "client update manifest")
    if not 0 < manifest.num_examples <= manifest.shard_examples:
        raise FedloraError(
            f"client update {path}: num_examples {manifest.num_examples} must be positive and at most "
            f"shard_examples {manifest.shard_examples}"
        )
    return ClientUpdate(path, manifest)


def write_update(
    final: Path, manifest: UpdateManifest, tensors: Mapping[str, torch.Tensor], overwrite: bool = False
) -> ClientUpdate:
    with atomic_dir(final, overwrite=overwrite) as tmp:
        manifest.bytes = save_tensors(tmp / UPDATE_TENSORS, tensors)
        write_json(tmp / UPDATE_MANIFEST, asdict(manifest))
    return ClientUpdate(Path(final), manifest)


@dataclass
class ClientState:
    """One round of a client's private state (the round-NNN folder)."""

    path: Path
    manifest: StateManifest

    def tensors(self) -> dict[str, torch.Tensor]:
        return load_tensors(self.path / STATE_TENSORS, "client state")


def latest_state(state_dir: Path, before_round: int) -> ClientState | None:
    """The client's state from the latest round before ``before_round``, or None for a new client."""
    state_dir = Path(state_dir)
    if not state_dir.exists():
        return None
    if not state_dir.is_dir():
        raise FedloraError(f"client state {state_dir} is not a folder")
    rounds = sorted(
        int(p.name[6:]) for p in state_dir.iterdir() if p.is_dir() and re.fullmatch(r"round-\d+", p.name)
    )
    rounds = [r for r in rounds if r < before_round]
    if not rounds:
        return None
    path = state_dir / round_dirname(rounds[-1])
    data = read_json(path / STATE_MANIFEST, "client state manifest")
    return ClientState(path, _from_dict(StateManifest, data, path / STATE_MANIFEST, "client state manifest"))


def write_state(
    state_dir: Path, manifest: StateManifest, tensors: Mapping[str, torch.Tensor]
) -> ClientState:
    final = Path(state_dir) / round_dirname(manifest.round)
    # Re-training a round (a resumed simulation) replaces that round's state; earlier rounds stay untouched.
    with atomic_dir(final, overwrite=True) as tmp:
        save_tensors(tmp / STATE_TENSORS, tensors)
        write_json(tmp / STATE_MANIFEST, asdict(manifest))
    return ClientState(final, manifest)


# --------------------------------------------------------------------------------------------------------
# The coordinator's DP-FedAvg ledger


@dataclass
class ServerLedger:
    """The coordinator's DP-FedAvg ledger: every DP-FedAvg release it made in one federation.

    A global checkpoint's manifest carries the releases made up to the moment it was written; a round
    aggregated a second time (``--overwrite``, or to another folder) is a second release of the same clients'
    data that no manifest along the chain would show. This file, written before each release, counts it.
    Each release is a dict: noise_multiplier, sample_rate, steps, delta, round, parent_digest, out, created;
    releases taken over from a checkpoint's manifest (a ledger started on a new machine) carry only the first
    three and ``from_manifest``, the checkpoint's path.
    """

    path: Path
    releases: list[dict[str, Any]]

    def history(self) -> list[list[float]]:
        return [[r["noise_multiplier"], r["sample_rate"], r["steps"]] for r in self.releases]


def read_server_ledger(path: Path) -> ServerLedger | None:
    """The ledger at ``path``, or None if there is none yet."""
    path = Path(path)
    if not path.exists():
        return None
    data = read_json(path, "DP-FedAvg ledger")
    releases = data.get("releases")
    ok = isinstance(releases, list) and all(
        isinstance(r, dict)
        and _has_type(r.get("noise_multiplier"), "float") and r["noise_multiplier"] >= 0
        and _has_type(r.get("sample_rate"), "float") and 0 < r["sample_rate"] <= 1
        and _has_type(r.get("steps"), "int") and r["steps"] >= 0
        for r in releases
    )
    if not ok:
        raise FedloraError(f"DP-FedAvg ledger {path} is malformed: each release needs noise_multiplier, sample_rate, steps")
    return ServerLedger(path, releases)


def server_ledger_path(ckpt: GlobalCheckpoint) -> Path:
    """The default ledger of the federation ``ckpt`` belongs to: one file per federation (named by the recipe
    digest) in the folder that holds the checkpoint, so two federations' checkpoints may share a folder."""
    return ckpt.path.resolve().parent / f"dp-fedavg-ledger-{ckpt.manifest.recipe_digest[:12]}.json"


def write_server_ledger(ledger: ServerLedger) -> None:
    """Replace the ledger file in one rename."""
    try:
        ledger.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(ledger.path) as tmp:
            write_json(tmp, {"format_version": FORMAT_VERSION, "releases": ledger.releases})
    except OSError as exc:
        raise FedloraError(f"cannot write the DP-FedAvg ledger {ledger.path}: {exc.strerror}; nothing released") from None
