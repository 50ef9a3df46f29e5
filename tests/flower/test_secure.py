"""Secure aggregation through Flower's real SecAgg+ (workflow and client mod), in process: a fake Grid routes each
message to the secure client app, each node keeping its Flower state across messages as a SuperNode does."""

from __future__ import annotations

import copy

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
