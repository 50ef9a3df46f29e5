"""The disk filling up while `aggregate` or `train-client` writes: one line, exit 1, nothing half-written, and the
same command succeeds once there is room again.

A full disk is made with a file-size limit (RLIMIT_FSIZE) on the `fedlora` process, SIGXFSZ ignored, so that a
write past the limit fails with EFBIG as a write to a full disk fails with ENOSPC. The limit sits between the sizes
of the files the command writes: the small ones fit, the tensors do not, so the failure comes half-way through.
"""

from __future__ import annotations

import json
import resource
import signal
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import private_recipe
from cli.helpers import ok

from fedlora_cli import privacy, recipe as recipes, storage
from fedlora_cli.data import partition as partitions

FEDLORA = Path(sys.executable).parent / "fedlora"
LIMIT = 5000  # bytes: the manifests, adapter_config.json and an empty state fit; the tiny model's tensors do not


def limited(*args: object) -> subprocess.CompletedProcess:
    """`fedlora ARGS` with files limited to LIMIT bytes (a write past it fails with EFBIG)."""

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))

    return subprocess.run([str(FEDLORA), *map(str, args)], capture_output=True, text=True, timeout=300,
                          preexec_fn=limit, check=False)


def one_line_no_room(done: subprocess.CompletedProcess, final: Path) -> None:
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr + done.stdout, done.stderr
    assert errors == [f"error: could not write {final}: File too large (the disk is full or a file-size or quota "
                      "limit was reached); nothing written: free some space and run it again"], done.stderr


def nothing_of(final: Path) -> None:
    """No folder, and no temporary sibling of it left behind."""
    assert not final.exists()
    assert [p.name for p in final.parent.iterdir() if p.name.startswith(f".{final.name}.")] == []


def test_aggregate_on_a_full_disk_writes_nothing_and_the_rerun_writes_the_same_bytes(federation_copy, make_recipe,
                                                                                      tmp_path):
    layout = federation_copy(make_recipe())
    updates = sorted(layout.update(1, "client-0").parent.iterdir())
    written = layout.global_checkpoint(1)  # what simulate aggregated from these very updates
    sizes = {p.name: p.stat().st_size for p in written.iterdir()}
    assert max(sizes.values()) > LIMIT > sizes[storage.GLOBAL_MANIFEST], sizes
    out = tmp_path / "g1"

    one_line_no_room(limited("aggregate", layout.global_checkpoint(0), *updates, "--out", out), out)
    nothing_of(out)

    ok(["aggregate", layout.global_checkpoint(0), *updates, "--out", out])
    assert same_checkpoint(out, written)


def same_checkpoint(a: Path, b: Path) -> bool:
    """The same files with the same bytes, the manifests alike but for when they were written."""
    def files(folder: Path) -> dict[str, object]:
        found: dict[str, object] = {p.name: p.read_bytes() for p in folder.iterdir()}
        found[storage.GLOBAL_MANIFEST] = {k: v for k, v in json.loads(found[storage.GLOBAL_MANIFEST]).items()
                                          if k != "created"}
        return found

    return files(a) == files(b)


def test_train_client_on_a_full_disk_writes_no_update_and_no_ledger_and_the_rerun_counts_the_round_once(
        tiny_model_dir, reviews_csv, partition_dir, tmp_path):
    """DP-SGD: the update does not fit. Before the fix the state (with a ledger counting the round) was written
    before the update failed, and the rerun was refused ('already trained round 1'; --overwrite counted it twice)."""
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(private_recipe(tiny_model_dir, reviews_csv, "fedavg", noise_multiplier=1.0)))
    ok(["init", recipe_file, "--data", partition_dir, "--out", tmp_path / "g0"])
    shard = partition_dir / partitions.shard_name("client-0")
    state, out = tmp_path / "client-0", tmp_path / "update"

    one_line_no_room(limited("train-client", tmp_path / "g0", "--data", shard, "--state", state, "--out", out), out)
    nothing_of(out)
    assert storage.state_rounds(state) == []  # no ledger counts a release that never left

    ok(["train-client", tmp_path / "g0", "--data", shard, "--state", state, "--out", out])
    update = storage.read_update(out)
    assert update.tensors_path.stat().st_size > LIMIT  # the limit did fall in the middle of the writes
    assert storage.state_rounds(state) == [1]
    ledger = privacy.Ledger.from_dict(storage.latest_state(state).manifest.privacy)
    assert len(ledger.history) == 1, ledger.history
    assert recipes.load(recipe_file).privacy.noise_multiplier == ledger.history[0][0]
