"""Gather privacy ledgers from client states, global checkpoints or a whole run folder, for reporting."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedlora_cli import privacy, storage
from fedlora_cli.errors import FedloraError
from fedlora_cli.privacy.ledgers import read_server_ledger, server_ledger_path


def _entry(who: str, ledger: privacy.Ledger) -> dict[str, Any]:
    after = [privacy.epsilon(ledger.history[: i + 1], ledger.delta, ledger.accountant)
             for i in range(len(ledger.history))]
    return {
        "who": who,
        "accountant": ledger.accountant,
        "delta": ledger.delta,
        "budget": ledger.budget,
        "history": [list(e) for e in ledger.history],
        "epsilon_after": after,
        "epsilon": after[-1] if after else 0.0,
    }


def client_entry(state_dir: Path, globals_dir: Path | None = None) -> dict[str, Any] | None:
    """A client's DP-SGD spending from its newest state, and the rounds it counts that the coordinator did not
    aggregate (``not_aggregated``), as far as the global checkpoints in ``globals_dir`` (default: those a Flower
    site received, STATE-DIR/flower/<federation>/global) tell."""
    state = storage.latest_state(state_dir)
    if state is None or state.manifest.privacy is None:
        return None
    cid = state.manifest.client_id
    entry = _entry(f"client {cid} (round {state.manifest.round})", privacy.Ledger.from_dict(state.manifest.privacy))
    if globals_dir is None:  # a Flower site's work folder: beside its federations' state folders, or in the state
        state = Path(state_dir)
        found = [state.parent / "flower" / state.name / storage.GLOBAL_DIR, state / "flower" / storage.GLOBAL_DIR]
        globals_dir = next((p for p in found if p.is_dir()), found[0])
    return {**entry, "not_aggregated": _not_aggregated(cid, storage.state_rounds(state_dir), globals_dir)}


def _not_aggregated(client_id: str, trained: list[int], globals_dir: Path) -> list[int]:
    """The rounds a client trained (and its ledger counts) whose global checkpoint, where it is at hand, does not
    list the client: its update came after the round's deadline, or was refused. Its epsilon over-counts them,
    which is safe; the report says so."""
    left_out = []
    for round_ in trained:
        manifest = Path(globals_dir) / storage.round_dirname(round_) / storage.GLOBAL_MANIFEST
        if not manifest.is_file():
            continue
        clients = storage.read_json(manifest, "global checkpoint manifest").get("clients")
        if isinstance(clients, list) and client_id not in clients:
            left_out.append(round_)
    return left_out


def reported_entries(run: storage.RunLayout) -> list[dict[str, Any]]:
    """Each client's DP-SGD spending as its newest client update in the run folder reports it: the epsilon its own
    accountant computed (an update carries no history; the client's state folder, at its site, has it)."""
    newest: dict[str, storage.ClientUpdate] = {}
    for path in run.client_updates():
        update = storage.read_update(path)
        newest[update.manifest.client_id] = update  # in round order: the last one read is the newest
    entries = []
    for cid, update in sorted(newest.items()):
        p = update.manifest.privacy
        if p is not None:
            entries.append({"who": f"client {cid} (round {update.manifest.round}, as its update reports)",
                            "accountant": p["accountant"], "delta": p["delta"], "budget": p["budget"],
                            "history": [], "epsilon_after": [], "epsilon": p["epsilon"]})
    return entries


def server_entry(global_dir: Path | storage.GlobalCheckpoint) -> dict[str, Any] | None:
    """DP-FedAvg spending: the coordinator's ledger beside the checkpoint if it knows more releases than the
    checkpoint's own history (a round aggregated again since), else that history. Takes the checkpoint's folder,
    or the checkpoint already read (an export's :class:`~fedlora_cli.federation.Global`)."""
    ckpt = global_dir if isinstance(global_dir, storage.GlobalCheckpoint) else storage.read_global(global_dir)
    sp = ckpt.manifest.recipe.get("server_privacy") or {}
    history = [(float(s), float(q), int(n)) for s, q, n in ckpt.manifest.server_privacy_ledger]
    who = f"server DP-FedAvg (round {ckpt.manifest.round})"
    coordinator = read_server_ledger(server_ledger_path(ckpt))
    if coordinator is not None and len(coordinator.releases) > len(history):
        history = [(float(s), float(q), int(n)) for s, q, n in coordinator.history()]
        who = f"server DP-FedAvg ({len(history)} releases in {coordinator.path.name})"
    if not history:
        return None
    delta = ckpt.manifest.server_privacy_delta or float(sp.get("delta", 1e-5))
    accounted = privacy.server_accounted(history)
    entry = _entry(who, privacy.Ledger(privacy.SERVER_ACCOUNTANT, delta, sp.get("target_epsilon"), accounted))
    return {**entry, "history": [list(e) for e in history]}


def collect(path: Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_dir():
        raise FedloraError(f"not found: {path}")
    entries: list[dict[str, Any] | None] = []
    run = storage.RunLayout(path)
    if (path / storage.GLOBAL_MANIFEST).is_file():
        entries.append(server_entry(path))
    elif run.is_run():
        states = run.client_states()
        # A Flower run's client states stay at the sites: what each client's update reports is what there is.
        entries += [client_entry(state_dir, run.root / storage.GLOBAL_DIR) for state_dir in states] if states \
            else reported_entries(run)
        rounds = run.global_checkpoints()
        if rounds:
            entries.append(server_entry(rounds[-1]))
    elif any(p.name.startswith("round-") for p in path.iterdir()):
        entries.append(client_entry(path))
    else:
        raise FedloraError(f"{path} is not a client state, global checkpoint or run folder")
    found = [e for e in entries if e is not None]
    if not found:
        raise FedloraError(f"{path} holds no privacy ledger (was the recipe run without privacy?)")
    return found
