"""The coordinator's DP-FedAvg ledger: dp-fedavg-ledger-<recipe digest>.json beside the global checkpoints.

It records every DP-FedAvg release the coordinator has made, including a round aggregated twice, and is
written before each release. It is bound to the federation, not to a path the operator gives: a ledger named
with --server-ledger must count every release the one beside the checkpoints does, and both are written. (A client's DP-SGD ledger travels in its client state: :class:`.accounting.Ledger`.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
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
    # Where else the ledger is written: the federation's own ledger beside the global checkpoint, when the
    # operator named another file (--server-ledger), so that it always holds every release.
    copies: list[Path] = field(default_factory=list)

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
    """Replace the ledger file (and its copies) each in one rename."""
    for path in [ledger.path, *ledger.copies]:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_file(path) as tmp:
                write_json(tmp, {"format_version": FORMAT_VERSION, "releases": ledger.releases})
        except OSError as exc:
            raise FedloraError(f"cannot write the DP-FedAvg ledger {path}: {exc.strerror}; nothing released") from None


def coordinator_ledger(ckpt: GlobalCheckpoint, path: Path | None = None) -> ServerLedger:
    """The coordinator's DP-FedAvg ledger for the federation ``ckpt`` belongs to.

    The federation's own ledger is :func:`server_ledger_path`, beside the checkpoint: it travels with the global
    checkpoints and always receives every release. Another ``path`` (--server-ledger) may be used as well, but it
    must count at least the releases the federation's own ledger counts (a fresh path would otherwise start the
    budget again), and each release is written to both. Where there is no ledger yet, for instance on a new
    coordinator machine, it starts from the releases the checkpoint's manifest records. A ledger that knows fewer
    releases than the checkpoint's own history belongs elsewhere and is refused.
    """
    chain = ckpt.manifest.server_privacy_ledger
    bound = server_ledger_path(ckpt)
    path = Path(path) if path is not None else bound
    ledger = read_server_ledger(path)
    if ledger is None:
        ledger = ServerLedger(path, [
            {"noise_multiplier": s, "sample_rate": q, "steps": n, "from_manifest": str(ckpt.path.resolve())}
            for s, q, n in chain
        ])
    elif len(ledger.releases) < len(chain):
        raise FedloraError(
            f"DP-FedAvg ledger {path} records {len(ledger.releases)} release(s) but global checkpoint {ckpt.path} "
            f"has {len(chain)} in its history: the ledger is not this federation's (give the right one with --server-ledger)"
        )
    if path.resolve() != bound.resolve():
        own = read_server_ledger(bound)
        if own is not None and len(own.releases) > len(ledger.releases):
            raise FedloraError(
                f"DP-FedAvg ledger {path} records {len(ledger.releases)} release(s), but this federation's ledger "
                f"beside global checkpoint {ckpt.path} ({bound}) records {len(own.releases)}: the budget counts every "
                "release of the federation; give that ledger (or leave --server-ledger out); nothing released"
            )
        ledger.copies = [bound]
    return ledger
