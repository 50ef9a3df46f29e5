"""Secure aggregation through Flower's real SecAgg+ (workflow and client mod), in process: a fake Grid routes each
message to the secure client app, each node keeping its Flower state across messages as a SuperNode does."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

pytest.importorskip("flwr")

from flwr.app import Context, RecordDict

from fedlora_cli import storage
from fedlora_cli.errors import FedloraError
from fedlora_cli.flower import client_app
from fedlora_cli.flower.site import SiteConfig
from fedlora_cli.storage.run_layout import RunLayout
from conftest import recipe_dict
from secure_check import assert_global_is_the_weighted_mean
from .test_server_app import FakeGrid, run_config, serve, sites

SECURE = {"num_shares": 3, "reconstruction_threshold": 2, "clipping_range": 1.0}


class SecureGrid(FakeGrid):
    """The fake Grid with each node's Context kept between messages (SecAgg+'s mod keeps its keys there), the
    secure client app answering, and ``drop_after`` nodes gone from the given training message on (1: after
    the setup stage, 2: after key sharing)."""

    def __init__(self, node_configs, drop_after=None):
        super().__init__(node_configs)
        self.contexts = {node: Context(run_id=1, node_id=node, node_config=cfg, state=RecordDict(), run_config={})
                         for node, cfg in node_configs.items()}
        self.drop_after = drop_after or {}
        self.train_messages = dict.fromkeys(node_configs, 0)

    def send_and_receive(self, messages, *, timeout=None):
        for msg in messages:
            node = msg.metadata.dst_node_id
            if msg.metadata.message_type == "train":
                self.train_messages[node] += 1
                if self.train_messages[node] > self.drop_after.get(node, 99):
                    self.gone.add(node)
        return super().send_and_receive(messages, timeout=timeout)

    def answer(self, msg, node):
        # A real message reaches each node as its own copy (SecAgg+'s mod edits what it receives).
        return client_app.secure_app(copy.deepcopy(msg), self.contexts[node])


def secure_recipe(tiny_model_dir, reviews_csv, method="ffa", **federation):
    raw = recipe_dict(tiny_model_dir, reviews_csv, method)
    raw["federation"].update(secure_aggregation=dict(SECURE), **federation)
    return raw


def site_updates(node_configs, round_, run):
    """Where each site keeps its update of ``round_`` of the federation of the run folder ``run``."""
    from fedlora_cli.flower.site import federation_folder, manifest_of

    g0 = manifest_of((RunLayout(run).global_checkpoint(0) / storage.GLOBAL_MANIFEST).read_text())
    return {cfg["client-id"]: SiteConfig.from_node_config(cfg).update(federation_folder(g0), round_)
            for cfg in node_configs.values()}


@pytest.mark.parametrize("method", ["ffa", "fedsa"])
def test_each_secure_global_is_the_weighted_mean_of_the_sites_updates(method, tmp_path, tiny_model_dir, reviews_csv,
                                                                     partition_dir):
    # Prepare
    nodes = sites(tmp_path, partition_dir)
    grid = SecureGrid(nodes)
    config = run_config(tmp_path, secure_recipe(tiny_model_dir, reviews_csv, method), partition_dir)
    # Execute
    serve(grid, config)
    # Assert: within the quantisation bound of the plain weighted mean, and no update on the coordinator's side
    layout = RunLayout(tmp_path / "run")
    for round_ in (1, 2):
        assert_global_is_the_weighted_mean(layout.global_checkpoint(round_ - 1), layout.global_checkpoint(round_),
                                           site_updates(nodes, round_, tmp_path / "run"))
        record = storage.read_global(layout.global_checkpoint(round_)).manifest.aggregation["secure_aggregation"]
        assert record["emulated"] is False and record["clients"] == ["client-0", "client-1", "client-2"]
        assert record["quantisation_step"] == 2 * SECURE["clipping_range"] / 2**22
        assert record["clamped_values"] == 0 and record["clipped_sites"] is None  # counted; no bound to clip to
    assert not (layout.root / "updates").exists() and not list(layout.root.rglob("*.staging*"))
    assert grid.trained() == [101, 102, 103] * 8  # four SecAgg+ stages a round


def test_a_site_lost_after_key_sharing_is_recovered_from_the_others_shares(tmp_path, tiny_model_dir, reviews_csv,
                                                                          partition_dir):
    nodes = sites(tmp_path, partition_dir)
    grid = SecureGrid(nodes, drop_after={103: 2})
    config = run_config(tmp_path, secure_recipe(tiny_model_dir, reviews_csv, rounds=1), partition_dir)
    serve(grid, config)
    layout = RunLayout(tmp_path / "run")
    updates = site_updates(nodes, 1, tmp_path / "run")
    del updates["client-2"]
    assert_global_is_the_weighted_mean(layout.global_checkpoint(0), layout.global_checkpoint(1), updates)


def test_below_the_threshold_the_round_fails_in_one_line_and_writes_nothing(tmp_path, tiny_model_dir, reviews_csv,
                                                                           partition_dir):
    nodes = sites(tmp_path, partition_dir)
    grid = SecureGrid(nodes, drop_after={102: 2, 103: 2})
    config = run_config(tmp_path, secure_recipe(tiny_model_dir, reviews_csv, rounds=1), partition_dir)
    with pytest.raises(FedloraError, match=r"^round 1: secure aggregation halted at its '.+' stage") as caught:
        serve(grid, config)
    assert "\n" not in str(caught.value)
    layout = RunLayout(tmp_path / "run")
    assert [p.name for p in layout.global_checkpoints()] == ["round-000"]
    assert not (layout.root / ".staging").exists()


def test_dp_fedavg_under_secagg_adds_the_sum_of_the_sites_clipped_differences_over_m(tmp_path, tiny_model_dir,
                                                                                      reviews_csv, partition_dir):
    # Prepare: DP-FedAvg with no noise, so the global is exactly what the sites sent, summed, over m = 3; one site
    # is lost after key sharing, so the sum of two is divided by 3 (DP-FedAvg's fixed m), not averaged
    import math

    import numpy as np

    from fedlora_cli.federation import secure
    from fedlora_cli.federation.common import Global

    nodes = sites(tmp_path, partition_dir)
    raw = secure_recipe(tiny_model_dir, reviews_csv, rounds=1)
    raw["server_privacy"] = {"clip_norm": 0.01, "noise_multiplier": 0.0}
    # Execute
    serve(SecureGrid(nodes, drop_after={103: 2}), run_config(tmp_path, raw, partition_dir))
    # Assert
    layout = RunLayout(tmp_path / "run")
    g0, g1 = Global.of(layout.global_checkpoint(0)), Global.of(layout.global_checkpoint(1))
    sent = sorted(n for n in g0.header if g0.plan.sends(n))
    bound = secure.site_bound(g0.recipe, sum(int(np.prod(g0.header[n][1])) for n in sent))
    expected = {n: np.zeros(g0.header[n][1]) for n in sent}
    survivors = site_updates(nodes, 1, tmp_path / "run")
    del survivors["client-2"]
    for path in survivors.values():
        u = storage.read_update(path)
        t = storage.load_verified(u.tensors_path, u.manifest.tensor_digests, "u", framework="numpy")
        d = {n: t[n].astype(np.float64) - g0.verified_arrays[n] for n in sent}
        norm = math.sqrt(sum(float(np.sum(x * x)) for x in d.values()))
        assert norm > bound  # every site's difference was clipped
        for n in sent:
            expected[n] += d[n] * (bound / norm) / 3
    step = 2 * SECURE["clipping_range"] / 2**22
    for n in sent:
        got = g1.verified_arrays[n].astype(np.float64) - g0.verified_arrays[n]
        ulp = np.spacing(np.abs(g1.verified_arrays[n]).astype(np.float32)).astype(np.float64)
        assert np.all(np.abs(got - expected[n]) <= step + 2 * ulp), n
    assert g1.manifest.server_privacy_ledger == [[0.0, 1.0, 1]]
    assert g1.manifest.aggregation["strategy"] == "dp-fedavg" and g1.manifest.clients == ["client-0", "client-1"]
    record = g1.manifest.aggregation["secure_aggregation"]
    assert record["clamped_values"] is None and record["clipped_sites"] is None  # no count leaves a site


def test_a_plain_training_message_never_gets_a_secure_federations_update_in_the_clear(tmp_path, tiny_model_dir,
                                                                                       reviews_csv, partition_dir):
    # Prepare: a secure federation's round-0 global, sent to a site through the plain app's training message (a
    # coordinator that names client_app:app, or sends one on purpose)
    from flwr.app import Message

    from fedlora_cli import recipe as recipes
    from fedlora_cli.federation.init import init
    from fedlora_cli.flower import transport

    raw = secure_recipe(tiny_model_dir, reviews_csv)
    raw["data"]["labels"] = ["neg", "pos"]
    g0 = init(recipes.from_dict(raw), tmp_path / "round-000")
    node = sites(tmp_path, partition_dir)[101]
    msg = Message(RecordDict(transport.pack(g0.path, client_app.GLOBAL)), 101, "train")
    msg.metadata.__dict__["_message_id"] = "m1"
    # Execute
    reply = client_app.app(msg, Context(run_id=1, node_id=101, node_config=node, state=RecordDict(), run_config={}))
    # Assert: fedlora's one line, no update packed, nothing trained
    answer = reply.content[client_app.REPLY]
    assert "refusing to send this site's update in a plain training message" in answer[client_app.ERROR_KEY]
    assert not reply.content.array_records
    written = [p for p in (tmp_path / "sites").rglob("*") if p.is_file()]
    assert written and all("global" in p.parts for p in written)  # only the received global checkpoint


def test_the_values_sites_clamped_reach_the_manifest_and_the_round_table_as_totals_with_one_warning(
        tmp_path, tiny_model_dir, reviews_csv, partition_dir, caplog):
    # Prepare: a clipping range below what 3 AdamW steps move B and the head by, and a norm bound that some sites
    # reach: SecAgg+ clamps values, which biases the sum unless the user is told
    from secure_check import site_counts

    nodes = sites(tmp_path, partition_dir)
    raw = secure_recipe(tiny_model_dir, reviews_csv, rounds=1, norm_bound=0.5)
    raw["federation"]["secure_aggregation"]["clipping_range"] = 0.005
    # Execute
    with caplog.at_level("INFO"):
        serve(SecureGrid(nodes), run_config(tmp_path, raw, partition_dir))
    # Assert: the manifest and the round's row hold the totals of what each site counted of its own update
    layout = RunLayout(tmp_path / "run")
    updates = site_updates(nodes, 1, tmp_path / "run")
    counts = [site_counts(layout.global_checkpoint(0), path) for path in updates.values()]
    clamped, clipped = sum(n for n, _ in counts), sum(c for _, c in counts)
    assert clamped > 0 and 0 < clipped < 3  # both counts are exercised, and the clip count is not all or nothing
    record = storage.read_global(layout.global_checkpoint(1)).manifest.aggregation["secure_aggregation"]
    assert (record["clamped_values"], record["clipped_sites"]) == (clamped, clipped)
    (row,) = json.loads(layout.rounds.read_text())
    assert (row["clamped_values"], row["clipped_sites"]) == (clamped, clipped)
    warnings = [r.getMessage() for r in caplog.records if "were clamped" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert f"round 1: {clamped} value(s)" in warnings[0] and "raise federation.secure_aggregation.clipping_range" \
        in warnings[0]


def test_a_bad_or_missing_site_count_is_left_out_of_the_totals_with_a_reason_not_a_failed_round():
    from fedlora_cli.federation import secure

    both = (secure.CLAMPED, secure.CLIPPED)
    tally, why = secure.Tally().add({"clamped": 2, "clipped": 1}, 10, "client-0", both)
    assert why is None
    tally, _ = tally.add({"clamped": 3, "clipped": 0}, 10, "client-1", both)
    assert (tally.clamped, tally.clipped, tally.counted) == (5, 1, 2)
    assert secure.Tally().add({}, 10, "client-0", ()) == (secure.Tally(), None)  # DP-FedAvg: nothing sent or known
    for sent, needle in (({"clamped": 11, "clipped": 0}, "sent clamped = 11 beside its vector, outside 0..10"),
                         ({"clamped": 1, "clipped": 2}, "sent clipped = 2 beside its vector, outside 0..1"),
                         ({"clamped": True, "clipped": 0}, "sent clamped = True"),
                         ({"clamped": -1, "clipped": 0}, "sent clamped = -1"),
                         ({"clamped": 1, "clipped": 0, "loss": 0.3}, "sent an unknown count 'loss'"),
                         ({"clamped": 1}, "sent no clipped count"), ({}, "sent no clamped count")):
        got, why = tally.add(sent, 10, "client-2", both)
        assert got == tally and why.startswith(f"client 'client-2' {needle}") and "\n" not in why
        assert why.endswith("; its counts are left out of the round's totals")


def test_a_site_sending_a_bad_count_or_none_keeps_the_round_and_the_totals_say_how_many_sites_they_cover(
        tmp_path, tiny_model_dir, reviews_csv, partition_dir, caplog, monkeypatch):
    # Prepare: of the three sites' replies, the first claims more clamped values than it has, the second no counts
    # (before: the round failed after SecAgg+ had unmasked a valid sum, and every retry the same; or the total of
    # two sites was recorded as everyone's)
    from fedlora_cli.flower import secure as app_module

    real, sent = app_module.site_reply, []

    def lying(vector, counts):
        sent.append(dict(counts))
        wrong = ({"clamped": 10**12}, {}, dict(counts))[len(sent) - 1]
        return real(vector, wrong)

    monkeypatch.setattr(app_module, "site_reply", lying)
    nodes = sites(tmp_path, partition_dir)
    # Execute
    with caplog.at_level("INFO"):
        serve(SecureGrid(nodes), run_config(tmp_path, secure_recipe(tiny_model_dir, reviews_csv, rounds=1),
                                            partition_dir))
    # Assert: the round is written from the unmasked sum; the totals cover the one honest site, and say so
    layout = RunLayout(tmp_path / "run")
    assert_global_is_the_weighted_mean(layout.global_checkpoint(0), layout.global_checkpoint(1),
                                       site_updates(nodes, 1, tmp_path / "run"))
    record = storage.read_global(layout.global_checkpoint(1)).manifest.aggregation["secure_aggregation"]
    assert (record["clamped_values"], record["counted_sites"]) == (sent[2]["clamped"], 1)
    (row,) = json.loads(layout.rounds.read_text())
    assert row["counted_sites"] == 1
    said = [r.getMessage() for r in caplog.records if "its counts are left out" in r.getMessage()]
    assert len(said) == 2 and all("\n" not in line and "round 1: client 'client-" in line for line in said)
    assert sum("sent clamped = 1000000000000" in line for line in said) == 1
    assert sum("sent no clamped count" in line for line in said) == 1


def fedavgm_expected(parent, updates, lr, beta, previous=None):
    """FedAvgM's step from the plain weighted mean, and its error bound: the round's pseudo-gradient Delta is the
    weighted mean of the differences (plain_mean's bound, plus the float32 rounding of parent + Delta the coordinator
    steps from), v = beta v + Delta, x += lr v. ``previous``: the last round's (Delta, bound) by tensor name."""
    from secure_check import plain_mean, ulp

    parent_t = storage.read_global(parent)
    x = storage.load_verified(parent_t.path / storage.ADAPTER_WEIGHTS, parent_t.manifest.tensor_digests, "x",
                              framework="numpy")
    out = {}
    for name, (delta, bound) in plain_mean(parent, updates).items():
        base = x[name].astype(np.float64)
        err = bound + ulp(base + delta)
        v, v_err = delta, err
        if previous is not None:
            v, v_err = beta * previous[name][0] + delta, beta * previous[name][1] + err
        out[name] = (base + lr * v, lr * v_err, delta, err)
    return out


def test_secure_rounds_under_server_momentum_step_from_the_unmasked_mean_and_carry_the_state(
        tmp_path, tiny_model_dir, reviews_csv, partition_dir):
    # Prepare: FedAvgM (linear, so each global is checkable against the plain weighted means within a bound)
    from secure_check import ulp

    lr, beta = 1.5, 0.5
    nodes = sites(tmp_path, partition_dir)
    raw = secure_recipe(tiny_model_dir, reviews_csv, server_optimizer="fedavgm", server_lr=lr, server_momentum=beta)
    # Execute
    serve(SecureGrid(nodes), run_config(tmp_path, raw, partition_dir))
    # Assert: x1 = x0 + lr D1, x2 = x1 + lr (beta D1 + D2), D_r the sites' weighted mean of round r
    layout = RunLayout(tmp_path / "run")
    previous = None
    for r in (1, 2):
        expected = fedavgm_expected(layout.global_checkpoint(r - 1), site_updates(nodes, r, tmp_path / "run"), lr,
                                    beta, previous)
        g = storage.read_global(layout.global_checkpoint(r))
        got = storage.load_verified(g.path / storage.ADAPTER_WEIGHTS, g.manifest.tensor_digests, "g", framework="numpy")
        for name, (x, bound, _, _) in expected.items():
            value = got[name].astype(np.float64)
            assert np.all(np.abs(value - x) <= bound + 2 * ulp(value)), (r, name)
        assert g.manifest.aggregation["server_optimizer"] == "fedavgm"
        assert "secure_aggregation" in g.manifest.aggregation
        previous = {name: (delta, err) for name, (_, _, delta, err) in expected.items()}
    assert storage.read_global(layout.global_checkpoint(2)).manifest.server_state_digests


def test_a_secure_round_under_fedadam_takes_adams_step_from_the_unmasked_mean(tmp_path, tiny_model_dir, reviews_csv,
                                                                              partition_dir):
    # Prepare: FedAdam's first step lr (1 - b1) D / (sqrt(b2 tau^2 + (1 - b2) D^2) + tau) moves by at most
    # lr (1 - b1) / ((sqrt(b2) + 1) tau) per unit of D, which turns the mean's bound into the step's
    from secure_check import plain_mean, ulp

    lr, b1, b2, tau = 0.01, 0.9, 0.99, 1e-3
    nodes = sites(tmp_path, partition_dir)
    raw = secure_recipe(tiny_model_dir, reviews_csv, rounds=1, server_optimizer="fedadam", server_lr=lr,
                        server_momentum=b1, server_beta2=b2, server_tau=tau)
    # Execute
    serve(SecureGrid(nodes), run_config(tmp_path, raw, partition_dir))
    # Assert
    layout = RunLayout(tmp_path / "run")
    g0, g1 = (storage.read_global(layout.global_checkpoint(r)) for r in (0, 1))
    x0 = storage.load_verified(g0.path / storage.ADAPTER_WEIGHTS, g0.manifest.tensor_digests, "x", framework="numpy")
    x1 = storage.load_verified(g1.path / storage.ADAPTER_WEIGHTS, g1.manifest.tensor_digests, "x", framework="numpy")
    lipschitz = lr * (1 - b1) / ((np.sqrt(b2) + 1) * tau)
    means = plain_mean(layout.global_checkpoint(0), site_updates(nodes, 1, tmp_path / "run"))
    for name, (delta, bound) in means.items():
        base = x0[name].astype(np.float64)
        step = lr * (1 - b1) * delta / (np.sqrt(b2 * tau**2 + (1 - b2) * delta**2) + tau)
        got = x1[name].astype(np.float64)
        allowed = lipschitz * (bound + ulp(base + delta)) + 4 * ulp(got) + 1e-6 * np.abs(step)
        assert np.all(np.abs(got - (base + step)) <= allowed), name
        assert np.max(np.abs(step)) > 100 * np.max(allowed)  # the step is really there, far beyond the tolerance
    assert g1.manifest.aggregation["server_optimizer"] == "fedadam" and g1.manifest.server_state_digests


def test_a_fixed_sample_runs_secagg_among_the_sampled_sites_only(tmp_path, tiny_model_dir, reviews_csv, partition_dir):
    # Prepare: 2 of 3 sites a round (fewer than num_shares 3: each site's neighbours are the two of them)
    from fedlora_cli import recipe as recipes
    from fedlora_cli.federation.sampling import asked

    nodes = sites(tmp_path, partition_dir)
    raw = secure_recipe(tiny_model_dir, reviews_csv, clients_per_round=2)
    grid = SecureGrid(nodes)
    # Execute
    serve(grid, run_config(tmp_path, raw, partition_dir))
    # Assert: each global is the weighted mean of the round's sample, and only the sample was asked
    layout = RunLayout(tmp_path / "run")
    f, node_of = recipes.from_dict(raw).federation, {cfg["client-id"]: node for node, cfg in nodes.items()}
    trained = []
    for r in (1, 2):
        sample = asked(f, raw["training"]["seed"], r)
        assert len(sample) == 2
        updates = {cid: path for cid, path in site_updates(nodes, r, tmp_path / "run").items() if cid in sample}
        assert_global_is_the_weighted_mean(layout.global_checkpoint(r - 1), layout.global_checkpoint(r), updates)
        trained += sorted(node_of[cid] for cid in sample) * 4
    assert sorted(grid.trained()) == sorted(trained)


def poisson_recipe(tiny_model_dir, reviews_csv):
    """3 clients, 1 expected a round (Poisson), with the first seed whose round 1 asks exactly one site (too few for
    SecAgg+ to sum) and round 2 at least two."""
    from fedlora_cli import recipe as recipes
    from fedlora_cli.federation import sampling

    raw = secure_recipe(tiny_model_dir, reviews_csv, clients_per_round=1, sampling="poisson")
    for seed in range(200):
        raw["training"]["seed"] = seed
        f = recipes.from_dict(raw).federation
        if len(sampling.asked(f, seed, 1)) == 1 and len(sampling.asked(f, seed, 2)) >= 2:
            return raw
    raise AssertionError("no such seed")


def test_a_poisson_sample_too_small_for_secagg_is_skipped(tmp_path, tiny_model_dir, reviews_csv, partition_dir):
    # Prepare: round 1's seeded sample is one site; SecAgg+ sums no fewer than reconstruction_threshold = 2, so
    # asking it would halt the protocol at every try (the run could never get past round 1). (Under DP-FedAvg the
    # recipe is refused: tests/federation/test_secure.py)
    nodes = sites(tmp_path, partition_dir)
    grid = SecureGrid(nodes)
    # Execute
    serve(grid, run_config(tmp_path, poisson_recipe(tiny_model_dir, reviews_csv), partition_dir))
    # Assert: round 1 asked nobody to train and carried the global forward; round 2 trained
    layout = RunLayout(tmp_path / "run")
    g0, g1, g2 = (storage.read_global(layout.global_checkpoint(r)).manifest for r in (0, 1, 2))
    assert g1.clients == [] and len(g1.asked) == 1
    assert g1.aggregation["strategy"] == "skipped" and g1.tensor_digests == g0.tensor_digests
    assert len(g2.clients) >= 2 and "secure_aggregation" in g2.aggregation
    assert len(grid.trained()) == 4 * len(g2.clients)  # only round 2's sites, four SecAgg+ stages each


def test_secure_rounds_through_the_resident_worker_relay_are_the_weighted_mean(tiny_model_dir, reviews_csv,
                                                                               partition_dir):
    # Prepare: client-0's SuperNode relays to a resident worker (the app imports no torch); the others train in
    # the app itself
    import shutil
    import tempfile
    from pathlib import Path

    from .test_worker import InProcessWorker

    root = Path(tempfile.mkdtemp(prefix="fs-", dir="/tmp"))  # a Unix socket path is at most 107 bytes
    try:
        nodes = sites(root, partition_dir)
        nodes[101]["worker"] = "required"
        resident = InProcessWorker(nodes[101])
        try:
            # Execute
            serve(SecureGrid(nodes), run_config(root, secure_recipe(tiny_model_dir, reviews_csv), partition_dir))
        finally:
            resident.close()
        # Assert: the worker trained client-0's two rounds, and each global is the weighted mean
        assert resident.worker.benches.loads == 1
        layout = RunLayout(root / "run")
        for r in (1, 2):
            assert_global_is_the_weighted_mean(layout.global_checkpoint(r - 1), layout.global_checkpoint(r),
                                               site_updates(nodes, r, root / "run"))
        assert not (layout.root / "updates").exists()
    finally:
        shutil.rmtree(root, ignore_errors=True)
