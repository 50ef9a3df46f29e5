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

(the coordinator's DP-FedAvg ledger is :mod:`fedlora_cli.privacy.ledgers`).

Tensors are read and written only as safetensors: nothing a client sends is ever unpickled. Every folder is
written to a temporary sibling and renamed into place, so an interrupted or failed command leaves either
the complete folder or nothing.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedlora_cli.errors import FedloraError
from fedlora_cli.storage.files import atomic_dir, load_tensors, read_json, save_tensors, write_json
from fedlora_cli.storage.manifests import GlobalManifest, StateManifest, UpdateManifest, _from_dict

if TYPE_CHECKING:
    import torch


ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
GLOBAL_MANIFEST = "fedlora.json"
CORRECTION_TENSORS = "correction.safetensors"
SERVER_STATE_TENSORS = "server_state.safetensors"
UPDATE_TENSORS = "update.safetensors"
UPDATE_MANIFEST = "update.json"
STATE_TENSORS = "local.safetensors"
STATE_MANIFEST = "state.json"


_CLIENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def valid_client_id(client_id: str) -> bool:
    return isinstance(client_id, str) and bool(_CLIENT_ID.fullmatch(client_id))  # '$' would let "a\n" through


def check_client_id(client_id: str) -> str:
    if not valid_client_id(client_id):
        raise FedloraError(
            f"client id {client_id!r:.80} must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or "
            "digit"
        )
    return client_id


def round_dirname(round_: int) -> str:
    return f"round-{round_:03d}"


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

    def server_state(self) -> dict[str, torch.Tensor]:
        """A server optimiser's state (its moments); empty if the federation has none."""
        if not self.manifest.server_state_digests:
            return {}
        return load_tensors(self.path / SERVER_STATE_TENSORS, "global checkpoint server state")


def _read_manifest(folder: Path, name: str, cls: type, what: str) -> Any:
    """The checked manifest ``name`` of the folder of a ``what`` (a global checkpoint, a client update...)."""
    path = folder / name
    return _from_dict(cls, read_json(path, f"{what} manifest"), path, f"{what} manifest")


def _folder(path: Path, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise FedloraError(f"{what} not found: {path}")
    return path


def read_global(path: Path) -> GlobalCheckpoint:
    path = _folder(path, "global checkpoint")
    manifest = _read_manifest(path, GLOBAL_MANIFEST, GlobalManifest, "global checkpoint")
    if not (path / ADAPTER_CONFIG).is_file():
        raise FedloraError(f"global checkpoint {path} has no {ADAPTER_CONFIG}")
    _check_identity(path, manifest)
    return GlobalCheckpoint(path, manifest)


# Each tensor file of a global checkpoint and the manifest field that lists its tensors' digests.
_GLOBAL_FILES = {ADAPTER_WEIGHTS: "tensor_digests", CORRECTION_TENSORS: "correction_digests",
                 SERVER_STATE_TENSORS: "server_state_digests"}


def _check_identity(path: Path, manifest: GlobalManifest) -> None:
    """A checkpoint's identity recomputed from the digests its manifest lists, and its files matched to them.

    The recorded ``digest`` is what client updates name as their parent; recomputing it here means a manifest
    edited consistently (a server optimiser's state stripped, a correction dropped) no longer passes for the
    checkpoint it was. A file listed must be there, and a tensor file present must be listed: one left unlisted
    would be silently ignored (moments restarting from zero)."""
    from fedlora_cli.storage.files import global_digest

    where = f"global checkpoint {path}"
    for name, field_name in _GLOBAL_FILES.items():
        listed, present = bool(getattr(manifest, field_name)), (path / name).is_file()
        if (listed or name == ADAPTER_WEIGHTS) and not present:
            raise FedloraError(f"{where} lacks {name}, which its manifest lists")
        if present and not listed and name != ADAPTER_WEIGHTS:
            raise FedloraError(f"{where} holds {name}, which its manifest ('{field_name}') does not list")
    expected = global_digest(manifest.tensor_digests, manifest.correction_digests, manifest.server_state_digests)
    if manifest.digest != expected:
        raise FedloraError(
            f"{where}: its manifest's digest is not the one its listed tensor digests give (the manifest was edited "
            "since it was written)"
        )


def write_global(
    final: Path, manifest: GlobalManifest, tensors: Mapping[str, torch.Tensor], adapter_config: dict[str, Any],
    overwrite: bool = False, correction: Mapping[str, torch.Tensor] | None = None,
    server_state: Mapping[str, torch.Tensor] | None = None,
) -> GlobalCheckpoint:
    with atomic_dir(final, overwrite=overwrite) as tmp:
        save_tensors(tmp / ADAPTER_WEIGHTS, tensors)
        if correction:
            save_tensors(tmp / CORRECTION_TENSORS, correction)
        if server_state:
            save_tensors(tmp / SERVER_STATE_TENSORS, server_state)
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
    path = _folder(path, "client update")
    manifest = _read_manifest(path, UPDATE_MANIFEST, UpdateManifest, "client update")
    if not 0 < manifest.num_examples <= manifest.shard_examples:
        raise FedloraError(
            f"client update {path}: num_examples {manifest.num_examples} must be positive and at most "
            f"shard_examples {manifest.shard_examples}"
        )
    return ClientUpdate(path, manifest)


def write_update(
    final: Path, manifest: UpdateManifest, tensors: Mapping[str, torch.Tensor], overwrite: bool = False
) -> ClientUpdate:
    with staged_update(final, manifest, tensors, overwrite) as update:
        return update


@contextlib.contextmanager
def staged_update(
    final: Path, manifest: UpdateManifest, tensors: Mapping[str, torch.Tensor], overwrite: bool = False
) -> Iterator[ClientUpdate]:
    """Write a client update in full beside ``final`` and yield it; it is renamed to ``final`` when the block
    succeeds, and removed when it fails. A client writes its state (the privacy ledger) inside the block: so a
    write that fails (a full disk) leaves neither, never a ledger that counts an update nobody can send."""
    with atomic_dir(final, overwrite=overwrite) as tmp:
        manifest.bytes = save_tensors(tmp / UPDATE_TENSORS, tensors)
        write_json(tmp / UPDATE_MANIFEST, asdict(manifest))
        yield ClientUpdate(Path(final), manifest)


@dataclass
class ClientState:
    """One round of a client's private state (the round-NNN folder)."""

    path: Path
    manifest: StateManifest

    def tensors(self) -> dict[str, torch.Tensor]:
        return load_tensors(self.path / STATE_TENSORS, "client state")


def latest_state(state_dir: Path, before_round: int | None = None) -> ClientState | None:
    """The client's state from the latest round before ``before_round`` (default: its newest), or None for a new
    client."""
    state_dir = Path(state_dir)
    if not state_dir.exists():
        return None
    if not state_dir.is_dir():
        raise FedloraError(f"client state {state_dir} is not a folder")
    rounds = [r for r in state_rounds(state_dir) if before_round is None or r < before_round]
    if not rounds:
        return None
    path = state_dir / round_dirname(rounds[-1])
    return ClientState(path, _read_manifest(path, STATE_MANIFEST, StateManifest, "client state"))


def state_rounds(state_dir: Path) -> list[int]:
    """The rounds a client's state folder holds, in order."""
    state_dir = Path(state_dir)
    if not state_dir.is_dir():
        return []
    return sorted(int(p.name[6:]) for p in state_dir.iterdir() if p.is_dir() and re.fullmatch(r"round-\d+", p.name))


def prune_states(state_dir: Path, keep: int) -> list[int]:
    """Delete all but the newest ``keep`` rounds of a client's state; returns the rounds deleted.

    Nothing is lost that a later round needs: a round starts from the newest state before it, and the newest
    state carries the whole privacy ledger.
    """
    import shutil

    if keep < 1:
        raise FedloraError(f"keep at least the newest client-state round; got {keep}")
    old = state_rounds(state_dir)[:-keep]
    for round_ in old:
        shutil.rmtree(Path(state_dir) / round_dirname(round_))
    return old


def write_state(
    state_dir: Path, manifest: StateManifest, tensors: Mapping[str, torch.Tensor]
) -> ClientState:
    final = Path(state_dir) / round_dirname(manifest.round)
    # Re-training a round (a resumed simulation) replaces that round's state; earlier rounds stay untouched.
    with atomic_dir(final, overwrite=True) as tmp:
        save_tensors(tmp / STATE_TENSORS, tensors)
        write_json(tmp / STATE_MANIFEST, asdict(manifest))
    return ClientState(final, manifest)
