"""The coordinator's DP-FedAvg ledger: dp-fedavg-ledger-<recipe digest>.json beside the global checkpoints.

It records every DP-FedAvg release the coordinator has made, including a round aggregated twice, and is
written before each release. (A client's DP-SGD ledger travels in its client state: :class:`.accounting.Ledger`.)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlora_cli.errors import FedloraError
from fedlora_cli.storage.checkpoints import GlobalCheckpoint
from fedlora_cli.storage.files import atomic_file, read_json, write_json
from fedlora_cli.storage.manifests import FORMAT_VERSION, _has_type


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


def coordinator_ledger(ckpt: GlobalCheckpoint, path: Path | None = None) -> ServerLedger:
    """The coordinator's DP-FedAvg ledger for the federation ``ckpt`` belongs to.

    Default path: :func:`server_ledger_path`. Where there is no ledger yet, for
    instance on a new coordinator machine, it starts from the releases the checkpoint's manifest records.
    A ledger that knows fewer releases than the checkpoint's own history belongs elsewhere and is refused.
    """
    chain = ckpt.manifest.server_privacy_ledger
    path = Path(path) if path is not None else server_ledger_path(ckpt)
    ledger = read_server_ledger(path)
    if ledger is None:
        return ServerLedger(path, [
            {"noise_multiplier": s, "sample_rate": q, "steps": n, "from_manifest": str(ckpt.path.resolve())}
            for s, q, n in chain
        ])
    if len(ledger.releases) < len(chain):
        raise FedloraError(
            f"DP-FedAvg ledger {path} records {len(ledger.releases)} release(s) but global checkpoint {ckpt.path} "
            f"has {len(chain)} in its history: the ledger is not this federation's (give the right one with --server-ledger)"
        )
    return ledger
