"""Faults across a real Flower deployment on 127.0.0.1 (tests/integration/flower_deploy.py): processes killed
mid-round, and what the federation's folders hold afterwards.

- The SuperLink SIGKILLed while the sites train round 2 of a DP-SGD federation (each site calibrating its own
  noise), restarted on its ``--database``: ``flwr run`` again resumes after round 1's global; every site's ledger
  counts each round once (a site that had trained round 2 sends that update again) at the sigma its own size
  needs, and round 2's global is the one ``fedlora aggregate`` writes from the same updates.
- The server app SIGKILLed while it aggregates (held just before it renames the new global into place): no global
  of that round, and the rerun writes the same bytes as ``fedlora aggregate`` from the same updates.

A site killed while its update is in flight is the load test's fault (test_flower_load.py). Every process started
here (and every child it started) is ended by its PID when the test ends, passed or not.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import yaml
from conftest import private_recipe, recipe_dict

pytest.importorskip("flwr")
pytest.importorskip("psutil")

from fedlora_cli import federation, privacy, recipe as recipes, storage
from fedlora_cli.data.examples import read_shard
from fedlora_cli.data.partition import shard_name
from fedlora_cli.flower.app_folder import node_config, write_app
from fedlora_cli.storage.run_layout import RunLayout

from .flower_deploy import Deployment, run_id, running, send, state_of, wait_until

pytestmark = pytest.mark.integration
CLIENTS = ["client-0", "client-1", "client-2"]
HOLD = Path(__file__).parent / "hold_rename"  # its sitecustomize holds a process before a rename


def sites_up(deployment: Deployment, tmp_path: Path, partition_dir: Path) -> dict[str, Path]:
    """A worker and a SuperNode for each client; each client's state folder."""
    states = {cid: tmp_path / "sites" / cid for cid in CLIENTS}
    configs = {cid: node_config(cid, str(partition_dir / shard_name(cid)), str(states[cid]), worker="required")
               for cid in CLIENTS}
    deployment.workers({cid: (configs[cid], states[cid]) for cid in CLIENTS})
    for cid in CLIENTS:
        deployment.supernode(configs[cid], cid)
    return states


def app_of(tmp_path: Path, raw: dict, run: Path) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return write_app(path, tmp_path / "app", run, round_timeout=240).parent


def submit(deployment: Deployment, app: Path) -> str:
    """``flwr run APP`` without --stream: the run is started and the command returns; its run id."""
    done = deployment.flwr("run", str(app), "local", timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return run_id(done.stdout + done.stderr)


def same_as_by_hand(layout: RunLayout, round_: int, clients: list[str], out: Path) -> None:
    """Round ``round_``'s global is byte for byte what ``aggregate`` writes from its updates (but its manifest's
    creation time)."""
    again = federation.aggregate_round(layout.global_checkpoint(round_ - 1), [layout.update(round_, c) for c in clients],
                                       out)
    written = layout.global_checkpoint(round_)
    assert storage.read_global(written).manifest.digest == again.checkpoint.manifest.digest
    assert sorted(p.name for p in written.iterdir()) == sorted(p.name for p in out.iterdir())
    for p in written.iterdir():
        if p.name != storage.GLOBAL_MANIFEST:
            assert p.read_bytes() == (out / p.name).read_bytes(), p.name


def test_the_superlink_killed_mid_round_resumes_on_its_database_and_no_ledger_counts_a_round_twice(
        deployment, tmp_path, tiny_model_dir, reviews_csv, partition_dir):
    # Each site calibrates its own noise to its own size (the coordinator has no partition to calibrate from).
    raw = private_recipe(tiny_model_dir, reviews_csv, "fedavg", target_epsilon=8.0, calibration="client")
    recipe = recipes.from_dict(raw)
    run = tmp_path / "run"
    app = app_of(tmp_path, raw, run)
    database = str(tmp_path / "superlink.db")
    started = time.monotonic()
    link = deployment.superlink("--insecure", "--database", database)
    states = sites_up(deployment, tmp_path, partition_dir)
    first = submit(deployment, app)
    layout = RunLayout(run)
    # Mid-round: round 1 done, and a site has trained round 2 (its state says so), its update not yet aggregated.
    wait_until(lambda: layout.global_checkpoint(0).is_dir()
               and any(2 in storage.state_rounds(state_of(s, layout)) for s in states.values()), 300,
               "no site trained round 2", every=0.1)
    send(deployment.seen[link.pid], signal.SIGKILL)
    link.wait(timeout=10)
    assert not layout.global_checkpoint(2).exists(), "killed too late: round 2 was aggregated already"
    trained_before = {cid: storage.state_rounds(state_of(s, layout)) for cid, s in states.items()}

    deployment.superlink("--insecure", "--database", database, name="superlink-again")
    log = deployment.run(app)
    statuses = deployment.status_by_run()
    deployment.end()
    seconds = time.monotonic() - started

    # The killed run is failed when its SuperLink comes back; the run started again completes.
    assert statuses == {first: "finished:failed", run_id(log): "finished:completed"}, (statuses, log[-3000:])
    assert "resuming" in log and "after round 1" in log, log[-3000:]
    assert [p.name for p in layout.global_checkpoints()] == ["round-000", "round-001", "round-002"]
    for cid, site in states.items():
        state = state_of(site, layout)
        assert storage.state_rounds(state) == [1, 2], cid
        ledger = privacy.Ledger.from_dict(storage.latest_state(state).manifest.privacy)
        assert len(ledger.history) == 2, (cid, ledger.history)  # each round counted once, none twice
        examples = len(read_shard(partition_dir / shard_name(cid), "text", "sentiment", 2))
        plan = privacy.client_plan(examples, recipe.training.batch_size, recipe.training.local_steps, None)
        assert [e[0] for e in ledger.history] == [privacy.calibrate_noise(recipe.privacy, [plan], 2)] * 2, cid
        assert ledger.epsilon() <= 8.0, cid
    resent = [cid for cid, rounds in trained_before.items() if 2 in rounds]
    for cid in resent:
        assert f"client '{cid}' sent again the update it had made" in log, log[-3000:]
    same_as_by_hand(layout, 2, CLIENTS, tmp_path / "again-2")
    assert deployment.all_ended()
    print(f"SuperLink killed mid-round 2 ({', '.join(resent)} had trained it), restarted: {statuses}; "
          f"{seconds:.1f} s")


def test_the_server_app_killed_while_it_aggregates_leaves_no_global_and_the_rerun_writes_the_same_bytes(
        deployment, tmp_path, tiny_model_dir, reviews_csv, partition_dir):
    """The ServerApp is held (tests/integration/hold_rename) as it renames round 1's complete global into place, and
    SIGKILLed there: the latest moment a partial global could be left."""
    raw = recipe_dict(tiny_model_dir, reviews_csv)
    raw["federation"]["rounds"] = 1
    run = tmp_path / "run"
    layout = RunLayout(run)
    app = app_of(tmp_path, raw, run)
    marker = tmp_path / "held"
    hold = {"PYTHONPATH": os.pathsep.join([str(HOLD), deployment.env["PYTHONPATH"]]),
            "FEDLORA_TEST_HOLD_RENAME": str(layout.global_checkpoint(1)), "FEDLORA_TEST_HOLD_MARKER": str(marker)}
    started = time.monotonic()
    deployment.superlink(env=hold)
    sites_up(deployment, tmp_path, partition_dir)
    submit(deployment, app)
    wait_until(marker.is_file, 300, "the server app never reached round 1's global")
    wait_until(lambda: marker.read_text().isdigit(), 10, "the held process never wrote its PID")
    deployment.note_descendants()
    held = deployment.seen[int(marker.read_text())]  # a process this deployment started (a ServerApp)
    send(held, signal.SIGKILL)
    wait_until(lambda: not running(held), 10, "the server app did not die")
    assert not layout.global_checkpoint(1).exists()
    assert [p.name for p in layout.global_checkpoints()] == ["round-000"]  # a leftover temporary folder is not one
    # Run again at once: the killed run is not finished before its ServerApp's heartbeat lapses (about a minute).

    log = deployment.run(app)
    statuses = deployment.status_by_run()
    deployment.end()
    seconds = time.monotonic() - started

    assert statuses[run_id(log)] == "finished:completed", (statuses, log[-3000:])
    assert "round 1: updates of client-0, client-1, client-2 already in the run folder; not asked again" in log, log
    same_as_by_hand(layout, 1, CLIENTS, tmp_path / "again-1")
    # The killed process's temporary folder, removed by the rerun's write.
    assert sorted(p.name for p in layout.root.joinpath("global").iterdir()) == ["round-000", "round-001"]
    assert deployment.all_ended()
    print(f"server app killed at aggregation, then run again: {statuses}; {seconds:.1f} s")
