"""A real Flower deployment on 127.0.0.1: a SuperLink and two SuperNodes (free ports, a temporary FLWR_HOME) driven
through ``flwr run``.

- Two rounds of the tiny recipe: each global checkpoint is the one fedlora aggregate writes from the same update
  folders.
- One SuperNode killed (SIGKILL) mid-round: with ``federation.min_clients: 1`` the round is the other site's
  update alone; with ``min_clients: 2`` the run ends finished:failed, its log says why in one line naming
  min_clients, and no global checkpoint is written for the round.

Every process started here (and every child it started: flower-superexec, the ClientApp and ServerApp
processes) is ended by its PID when the test ends, passed or not (the ``deployment`` fixture).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import yaml
from conftest import recipe_dict

pytest.importorskip("flwr")
pytest.importorskip("psutil")

from fedlora_cli import federation, storage
from fedlora_cli.data.partition import TEST_SHARD, shard_name
from fedlora_cli.flower.app_folder import node_config, write_app
from fedlora_cli.flower.site import SiteConfig
from fedlora_cli.storage.run_layout import RunLayout

from .flower_deploy import state_of, wait_until

pytestmark = pytest.mark.integration
SITES = ("site-a", "site-b")


def two_site_recipe(tmp_path: Path, tiny_model_dir: Path, reviews_csv: Path, **federation_keys) -> Path:
    raw = recipe_dict(tiny_model_dir, reviews_csv)
    raw["federation"].update(clients=2, client_ids=list(SITES), **federation_keys)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def site_config(tmp_path: Path, partition_dir: Path, i: int) -> str:
    return node_config(SITES[i], str(partition_dir / shard_name(f"client-{i}")), str(tmp_path / "sites" / SITES[i]))


def test_two_rounds_on_a_real_superlink_and_two_supernodes(deployment, tmp_path, tiny_model_dir, reviews_csv,
                                                           partition_dir):
    run = tmp_path / "run"
    app = write_app(two_site_recipe(tmp_path, tiny_model_dir, reviews_csv), tmp_path / "app", run, round_timeout=240,
                    test=str(partition_dir / TEST_SHARD)).parent
    started = time.monotonic()
    deployment.superlink()
    for i, cid in enumerate(SITES):
        deployment.supernode(site_config(tmp_path, partition_dir, i), cid)
    deployment.run(app)
    statuses = deployment.statuses()
    deployment.end()
    seconds = time.monotonic() - started
    layout = RunLayout(run)
    assert [p.name for p in layout.global_checkpoints()] == ["round-000", "round-001", "round-002"], \
        (deployment.logs / "flwr-run.log").read_text()[-3000:]
    assert statuses == ["finished:completed"]
    for round_ in (1, 2):
        updates = [layout.update(round_, cid) for cid in SITES]
        again = federation.aggregate_round(layout.global_checkpoint(round_ - 1), updates, tmp_path / f"again-{round_}")
        assert storage.read_global(layout.global_checkpoint(round_)).manifest.digest == again.checkpoint.manifest.digest
    assert storage.state_rounds(state_of(tmp_path / "sites" / "site-a", layout)) == [1, 2]
    assert deployment.all_ended()
    print(f"flower deployment, 2 rounds: {seconds:.1f} s")


@pytest.mark.parametrize("min_clients", [1, 2])
def test_a_supernode_killed_mid_round(deployment, tmp_path, tiny_model_dir, reviews_csv, partition_dir, min_clients):
    """site-b's SuperNode (and the processes it started) is SIGKILLed while it trains round 1.

    The moment is found by timing, without a hook in fedlora: the round's train message is the first that makes a
    site's ClientApp unpack the global checkpoint into its work folder (a query writes nothing there), so the test
    kills the node as soon as ``WORK/global/round-000`` appears at site-b, before its update can be made (a fresh
    ClientApp still has to load the model and train). The SuperLink notices a dead node only when its heartbeat
    lapses (about a minute); the round's deadline (round-timeout, short here) is what ends the round. One round
    only: a second would ask the dead node again and wait a second deadline.
    """
    run = tmp_path / "run"
    recipe = two_site_recipe(tmp_path, tiny_model_dir, reviews_csv, rounds=1, min_clients=min_clients)
    # No test data: the coordinator's evaluation is not what this test is about.
    app = write_app(recipe, tmp_path / "app", run, round_timeout=45).parent
    started = time.monotonic()
    deployment.superlink()
    nodes = [deployment.supernode(site_config(tmp_path, partition_dir, i), cid) for i, cid in enumerate(SITES)]
    work = SiteConfig.from_node_config({"client-id": "site-b", "state-dir": str(tmp_path / "sites" / "site-b")}
                                       ).work_dir
    flwr = deployment.start("flwr-run", "flwr", "run", str(app), "local", "--stream")  # its log: the ServerApp's
    # WORK/<federation>/global/round-000 (the federation's folder is named after the recipe).
    wait_until(lambda: any(work.glob("*/global/round-000")), 180, "site-b never received round 1's train message",
               every=0.1)
    deployment.kill(nodes[1])
    killed_at = time.monotonic() - started
    flwr.wait(timeout=300)
    log = (deployment.logs / "flwr-run.log").read_text()
    statuses = deployment.statuses()
    deployment.end()
    seconds = time.monotonic() - started
    layout = RunLayout(run)
    assert not layout.update(1, "site-b").exists()
    assert "round 1: client 'site-b' sent no reply within 45 s; left out" in log, log[-3000:]
    if min_clients == 1:
        assert statuses == ["finished:completed"], log[-3000:]
        written = storage.read_global(layout.global_checkpoint(1))
        assert written.manifest.clients == ["site-a"]
        assert [p.name for p in (layout.root / "updates" / "round-001").iterdir()] == ["site-a"]
        again = federation.aggregate_round(layout.global_checkpoint(0), [layout.update(1, "site-a")],
                                           tmp_path / "again")
        assert written.manifest.digest == again.checkpoint.manifest.digest
    else:
        assert statuses == ["finished:failed"], log[-3000:]
        # fedlora's one line; Flower then logs the ServerApp's exception with its traceback (it does so for any
        # exception, and raising one is what marks the run finished:failed).
        said = [line for line in log.splitlines() if "fedlora:" in line and "min_clients" in line]
        assert len(said) == 1, said
        assert re.search(r"fedlora: round 1: [01] client update\(s\) of 2 asked, fewer than "
                         r"federation.min_clients = 2; nothing written$", said[0]), said
        assert [p.name for p in layout.global_checkpoints()] == ["round-000"]
        assert not (layout.root / "updates").exists()
    assert deployment.all_ended()
    print(f"flower deployment, min_clients {min_clients}: site-b killed at {killed_at:.1f} s, {seconds:.1f} s in all")
