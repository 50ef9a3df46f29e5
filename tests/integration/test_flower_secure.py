"""Secure aggregation on a real Flower deployment on 127.0.0.1 (tests/integration/flower_deploy.py): 3 SuperNodes,
SecAgg+ with num_shares 3 and reconstruction_threshold 2.

- FFA-LoRA and FedSA-LoRA, 2 rounds: each global checkpoint is the plain weighted mean of the same sites' updates
  (which each site keeps in its own folder) within the quantisation bound (tests/secure_check.py), the manifest
  says it was securely aggregated, and the coordinator's run folder holds no client update.
- A SuperNode killed after key sharing (once it has received the round's training message), under DP-FedAvg: the
  round completes from the two survivors, the global moves by their clipped differences summed over m = 3 plus
  Gaussian noise of standard deviation sigma x C / m, and the epsilon the ledger records and the server prints is
  the plain (non-secure) accountant's for the same history; two killed: the run fails with one line and writes no
  global checkpoint.

Every process started here (and every child it started) is ended by its PID when the test ends, passed or not.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import yaml
from conftest import recipe_dict
from secure_check import assert_global_is_the_weighted_mean

pytest.importorskip("flwr")
pytest.importorskip("psutil")

from fedlora_cli import storage
from fedlora_cli.data.partition import shard_name
from fedlora_cli.flower.app_folder import node_config, write_app
from fedlora_cli.flower.site import SiteConfig
from fedlora_cli.storage.run_layout import RunLayout

from .flower_deploy import state_of, wait_until

pytestmark = pytest.mark.integration
CLIENTS = ["client-0", "client-1", "client-2"]


def start(deployment, tmp_path, tiny_model_dir, reviews_csv, partition_dir, method="ffa", rounds=2,
          round_timeout=240.0, held=(), server_privacy=None):
    """The recipe under SecAgg+ (and DP-FedAvg with ``server_privacy``), its app folder, the SuperLink and three
    SuperNodes; returns (app, configs, nodes). The ``held`` sites stop in round 1 as their update is complete, before
    their masked vector leaves (tests/integration/hold_rename): after key sharing, whatever the machine's speed."""
    raw = recipe_dict(tiny_model_dir, reviews_csv, method)
    raw["federation"].update(rounds=rounds, secure_aggregation={"num_shares": 3, "reconstruction_threshold": 2,
                                                                "clipping_range": 1.0})
    if server_privacy is not None:
        raw["server_privacy"] = dict(server_privacy)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    app = write_app(recipe, tmp_path / "app", tmp_path / "run", round_timeout=round_timeout).parent
    assert "client_app:secure_app" in (app / "pyproject.toml").read_text()
    configs = {cid: node_config(cid, str(partition_dir / shard_name(cid)), str(tmp_path / "sites" / cid),
                                worker="off") for cid in CLIENTS}
    deployment.superlink()
    nodes = {cid: deployment.supernode(configs[cid], cid, env=hold(deployment, tmp_path, cid) if cid in held else None)
             for cid in CLIENTS}
    return app, configs, nodes


HOLD = Path(__file__).parent / "hold_rename"


def hold(deployment, tmp_path, cid):
    """The variables that hold site ``cid``'s processes at the rename of its round-1 update into place."""
    return {"PYTHONPATH": os.pathsep.join([str(HOLD), deployment.env["PYTHONPATH"]]),
            "FEDLORA_TEST_HOLD_RENAME": str(tmp_path / "sites" / cid / "flower" / "*" / "updates" / "round-001"),
            "FEDLORA_TEST_HOLD_MARKER": str(tmp_path / f"held-{cid}")}


def site_update(tmp_path, cid, round_):
    """Where a site keeps its own update of a round (in its work folder, as the site itself finds it)."""
    federation = state_of(tmp_path / "sites" / cid, RunLayout(tmp_path / "run")).name
    return SiteConfig.from_node_config({"client-id": cid, "state-dir": str(tmp_path / "sites" / cid)}).update(
        federation, round_)


@pytest.mark.parametrize("method", ["ffa", "fedsa"])
def test_each_round_is_the_weighted_mean_of_the_sites_updates_within_the_quantisation_bound(
        method, deployment, tmp_path, tiny_model_dir, reviews_csv, partition_dir):
    started = time.monotonic()
    app, configs, _ = start(deployment, tmp_path, tiny_model_dir, reviews_csv, partition_dir, method)
    log = deployment.run(app)
    statuses = deployment.statuses()
    deployment.end()
    seconds = time.monotonic() - started

    layout = RunLayout(tmp_path / "run")
    assert statuses == ["finished:completed"], log[-3000:]
    assert [p.name for p in layout.global_checkpoints()] == ["round-000", "round-001", "round-002"], log[-3000:]
    worst = 0.0
    for n in (1, 2):
        worst = max(worst, assert_global_is_the_weighted_mean(
            layout.global_checkpoint(n - 1), layout.global_checkpoint(n),
            {cid: site_update(tmp_path, cid, n) for cid in CLIENTS}))
        record = storage.read_global(layout.global_checkpoint(n)).manifest.aggregation["secure_aggregation"]
        assert record["emulated"] is False and record["clients"] == CLIENTS
        # The sites' counts came through Flower beside the masked vectors (none clamped: c = 1 is far above these
        # differences); no site clips without a norm bound, so none says whether it did.
        assert record["clamped_values"] == 0 and record["clipped_sites"] is None
    # No client update, staged or placed, on the coordinator's side; the server's log names no update's values.
    assert not (layout.root / "updates").exists() and not (layout.root / ".staging").exists()
    assert not list(layout.root.rglob("update.safetensors"))
    assert "SecAgg+ unmasked the weighted sum of 3 site(s)" in log
    assert deployment.all_ended()
    print(f"flower secure aggregation, {method}, 3 sites, 2 rounds: {seconds:.1f} s; largest error {worst:.2f} of "
          "the bound")


def kill_after_key_sharing(deployment, tmp_path, nodes, victims):
    """Kill each victim's SuperNode once it is held with its round-1 update made (SecAgg+'s third stage): its
    keys are shared, its masked vector is not sent."""
    for cid in victims:
        wait_until((tmp_path / f"held-{cid}").is_file, 300, f"{cid} never made its round-1 update")
        deployment.kill(nodes[cid])


def run_with_victims(deployment, tmp_path, tiny_model_dir, reviews_csv, partition_dir, victims, server_privacy=None):
    """One secure round whose ``victims`` are killed after key sharing; (the run's log, statuses, run layout)."""
    import threading

    app, _, nodes = start(deployment, tmp_path, tiny_model_dir, reviews_csv, partition_dir, rounds=1,
                          round_timeout=150.0, held=victims, server_privacy=server_privacy)
    killer = threading.Thread(target=kill_after_key_sharing, args=(deployment, tmp_path, nodes, victims))
    killer.start()
    log = deployment.run(app, timeout=600)
    killer.join()
    statuses = deployment.statuses()
    deployment.end()
    return log, statuses, RunLayout(tmp_path / "run")


# DP-FedAvg with a clip far below the sites' differences (every site clips) and noise small enough for their sum
# to be seen under it: sigma 0.02 (epsilon about 1.5e3: a test of the arithmetic, not a useful guarantee).
DP = {"clip_norm": 0.01, "noise_multiplier": 0.02, "delta": 1e-5}


def test_a_site_killed_after_key_sharing_leaves_the_round_to_the_survivors_and_dp_fedavg_releases_their_sum(
        deployment, tmp_path, tiny_model_dir, reviews_csv, partition_dir):
    import numpy as np

    from fedlora_cli.federation.common import Global
    from fedlora_cli.privacy.accounting import server_epsilon

    log, statuses, layout = run_with_victims(deployment, tmp_path, tiny_model_dir, reviews_csv, partition_dir,
                                             ["client-2"], server_privacy=DP)
    assert statuses == ["finished:completed"], log[-3000:]
    assert deployment.all_ended()
    g0, g1 = Global.of(layout.global_checkpoint(0)), Global.of(layout.global_checkpoint(1))
    assert g1.manifest.clients == CLIENTS[:2] and g1.manifest.aggregation["strategy"] == "dp-fedavg"
    record = g1.manifest.aggregation["secure_aggregation"]
    assert record["weights"] == {"client-0": 1, "client-1": 1}  # equal weights under DP-FedAvg
    assert record["clamped_values"] is None and record["clipped_sites"] is None  # no count leaves a site
    # The release: the survivors' differences, each clipped at its site, summed over the fixed m = 3, plus noise
    sent = sorted(n for n in g0.header if g0.plan.sends(n))
    d = {cid: clipped_difference(g0, site_update(tmp_path, cid, 1), sent) for cid in CLIENTS[:2]}
    moved = np.concatenate([(g1.verified_arrays[n].astype(np.float64) - g0.verified_arrays[n]).ravel() for n in sent])
    total = sum(d.values())
    std = DP["noise_multiplier"] * DP["clip_norm"] / 3
    residual = moved - total / 3
    assert moved.size > 500  # the std estimate is within about 3% (1 / sqrt(2 n)); 12% is four of those
    assert float(np.std(residual)) == pytest.approx(std, rel=0.12)
    assert abs(float(np.mean(residual))) < 4 * std / np.sqrt(moved.size)
    # The check can tell: the survivors' plain mean (their sum over 2) would leave a sixth of the sum in the
    # residual (about 1.4 x the noise here, measured in process).
    assert float(np.std(moved - total / 2)) > 1.2 * std
    # The epsilon: what the accountant of a plain DP-FedAvg round computes for one release at sigma, q = 1
    eps = server_epsilon([(DP["noise_multiplier"], 1.0, 1)], DP["delta"])
    assert g1.manifest.server_privacy_ledger == [[DP["noise_multiplier"], 1.0, 1]]
    (row,) = json.loads(layout.rounds.read_text())
    assert row["server_epsilon"] == eps
    assert "server eps" in log and f"{eps:.3f}" in log, log[-3000:]


def clipped_difference(g0, update_dir, sent):
    """A site's difference from the global as it clipped it under DP-FedAvg (to C less the quantisation's worst
    case), flattened in tensor-name order; asserted to have been clipped."""
    import math

    import numpy as np

    from fedlora_cli.federation import secure

    u = storage.read_update(update_dir)
    t = storage.load_verified(u.tensors_path, u.manifest.tensor_digests, "update", framework="numpy")
    diff = np.concatenate([(t[n].astype(np.float64) - g0.verified_arrays[n]).ravel() for n in sent])
    bound = secure.site_bound(g0.recipe, diff.size)
    norm = math.sqrt(float(diff @ diff))
    assert norm > bound
    return diff * (bound / norm)


def test_two_sites_killed_after_key_sharing_fail_the_run_in_one_line_and_write_nothing(
        deployment, tmp_path, tiny_model_dir, reviews_csv, partition_dir):
    log, statuses, layout = run_with_victims(deployment, tmp_path, tiny_model_dir, reviews_csv, partition_dir,
                                             ["client-1", "client-2"])
    assert statuses == ["finished:failed"], log[-3000:]
    lines = [line for line in log.splitlines() if "secure aggregation halted" in line]
    assert lines and "nothing written" in lines[0], log[-3000:]
    assert [p.name for p in layout.global_checkpoints()] == ["round-000"]
    assert not (layout.root / ".staging").exists()
    assert deployment.all_ended()
