"""The server app driven against an in-process fake Grid that routes each message to the client app (no network,
no SuperLink): the rounds it writes are the ones fedlora aggregate writes, a restart redoes nothing, a re-sent
round spends no privacy budget, and a site with another base, a dead node and a bad update are each left out
by name."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from uuid import uuid4

import pytest

pytest.importorskip("flwr")

import yaml
from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode

from fedlora_cli import federation, storage
from fedlora_cli.data.partition import TEST_SHARD, VALIDATION_SHARD, shard_name
from fedlora_cli.errors import FedloraError
from fedlora_cli.federation import rounds
from fedlora_cli.flower import client_app, server_app
from fedlora_cli.storage.run_layout import RunLayout
from conftest import private_recipe, recipe_dict

SUPERLINK_NODE = 0


class FakeGrid:
    """Routes each message to the client app in this process, with the node's --node-config as its context.

    ``silent`` nodes never answer (dead or late); ``gone`` nodes are answered for by the SuperLink with Flower's
    NODE_UNAVAILABLE error reply (its sender is the SuperLink, not the node); ``tamper`` edits a node's reply on its
    way back."""

    def __init__(self, node_configs: dict[int, dict]):
        self.node_configs = node_configs
        self.silent: set[int] = set()
        self.gone: set[int] = set()
        self.tamper: dict[int, callable] = {}
        self.sent: list[tuple[str, int]] = []  # (message type, node)
        self.timeouts: list[float | None] = []
        self.late: set[int] = set()  # nodes whose next training reply comes after the round's deadline (dropped)

    def get_node_ids(self):
        return list(self.node_configs)

    def send_and_receive(self, messages, *, timeout=None):
        self.timeouts.append(timeout)
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid4().hex  # the SuperLink's job
            node = msg.metadata.dst_node_id
            self.sent.append((msg.metadata.message_type, node))
            if node in self.silent:
                continue
            if node in self.gone:
                reply = Message(Error(ErrorCode.NODE_UNAVAILABLE, "Node is unavailable"), reply_to=msg)
                reply.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE
                replies.append(reply)
                continue
            reply = self.answer(msg, node)
            if node in self.late and msg.metadata.message_type == "train":
                self.late.discard(node)
                continue
            if node in self.tamper:
                self.tamper[node](reply)
            replies.append(reply)
        return replies

    def answer(self, msg, node):
        context = Context(run_id=1, node_id=node, node_config=self.node_configs[node], state=RecordDict(), run_config={})
        return client_app.app(msg, context)

    def trained(self) -> list[int]:
        return [node for kind, node in self.sent if kind == "train"]


def sites(tmp_path: Path, partition_dir: Path, n: int = 3, **extra) -> dict[int, dict]:
    """Node ids 101, 102, ... that are not the client ids: each site names itself in its node config."""
    return {
        101 + i: {"client-id": f"client-{i}", "data": str(partition_dir / shard_name(f"client-{i}")),
                  "state-dir": str(tmp_path / "sites" / f"client-{i}"), **extra}
        for i in range(n)
    }


def run_config(tmp_path: Path, raw: dict, partition_dir: Path, **extra) -> dict:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return {"recipe": str(path), "run-dir": str(tmp_path / "run"), "test": str(partition_dir / TEST_SHARD),
            "round-timeout": 30.0, "query-timeout": 30.0, **extra}


def state_of(tmp_path: Path, client: str) -> Path:
    """The client state folder of site ``client`` (of :func:`sites`) in the federation of the run ``tmp_path/run``."""
    from fedlora_cli.flower.site import federation_folder, manifest_of

    g0 = RunLayout(tmp_path / "run").global_checkpoint(0) / storage.GLOBAL_MANIFEST
    return tmp_path / "sites" / client / federation_folder(manifest_of(g0.read_text()))


def serve(grid: FakeGrid, config: dict) -> None:
    server_app.app(grid, Context(run_id=1, node_id=SUPERLINK_NODE, node_config={}, state=RecordDict(),
                                 run_config=config))


def test_each_round_is_what_fedlora_aggregate_writes_from_the_same_updates(tmp_path, tiny_model_dir, reviews_csv,
                                                                           partition_dir):
    # Prepare
    grid = FakeGrid(sites(tmp_path, partition_dir))
    config = run_config(tmp_path, recipe_dict(tiny_model_dir, reviews_csv), partition_dir)
    # Execute
    serve(grid, config)
    # Assert
    layout = RunLayout(tmp_path / "run")
    assert [p.name for p in layout.global_checkpoints()] == ["round-000", "round-001", "round-002"]
    for round_ in (1, 2):
        updates = [layout.update(round_, f"client-{i}") for i in range(3)]
        again = federation.aggregate_round(layout.global_checkpoint(round_ - 1), updates, tmp_path / f"again-{round_}")
        written = storage.read_global(layout.global_checkpoint(round_))
        assert written.manifest.digest == again.checkpoint.manifest.digest
        assert written.manifest.clients == ["client-0", "client-1", "client-2"]
        assert json.loads(layout.metrics(round_).read_text())["global"]["accuracy"] is not None
    assert grid.trained() == [101, 102, 103] * 2
    assert grid.timeouts == [30.0, 30.0, 30.0]  # one query, then a deadline on each round
    # The run folder has simulate's table of rounds and learning curves.
    rows = json.loads(layout.rounds.read_text())
    assert [(row["round"], row["clients"]) for row in rows] == [(1, 3), (2, 3)]
    assert rows[1]["global_accuracy"] == json.loads(layout.metrics(2).read_text())["global"]["accuracy"]
    assert layout.curves.read_bytes().startswith(b"\x89PNG")
    # Each site kept its own state under its own id, and Flower's node id appears nowhere in the run.
    assert storage.state_rounds(state_of(tmp_path, "client-1")) == [1, 2]
    assert not any("101" in p.name for p in layout.root.rglob("*"))
    # No staging folder is left behind, empty or not (issue 26 found an empty RUN/.flower-staging/).
    assert not [p for p in layout.root.iterdir() if "staging" in p.name]


def test_a_restarted_server_redoes_no_round_and_no_update(tmp_path, tiny_model_dir, reviews_csv, partition_dir):
    grid = FakeGrid(sites(tmp_path, partition_dir))
    config = run_config(tmp_path, recipe_dict(tiny_model_dir, reviews_csv), partition_dir)
    serve(grid, config)
    layout = RunLayout(tmp_path / "run")
    round_2 = storage.read_global(layout.global_checkpoint(2)).manifest.digest
    # The server stopped after client-1's update of round 2 came in (round 2 itself not written).
    shutil.rmtree(layout.global_checkpoint(2))
    shutil.rmtree(layout.update(2, "client-0"))
    shutil.rmtree(layout.update(2, "client-2"))
    grid.sent.clear()
    # Execute
    serve(grid, config)
    # Assert: only the two missing updates were asked for; the sites sent the ones they had made, untrained
    assert grid.trained() == [101, 103]
    assert storage.state_rounds(state_of(tmp_path, "client-0")) == [1, 2]
    assert storage.read_global(layout.global_checkpoint(2)).manifest.digest == round_2
    grid.sent.clear()
    serve(grid, config)
    assert grid.trained() == []


def test_a_resent_round_spends_no_privacy_budget_and_no_reply_carries_the_loss(tmp_path, tiny_model_dir,
                                                                               reviews_csv, partition_dir):
    raw = private_recipe(tiny_model_dir, reviews_csv, noise_multiplier=1.0)
    raw["federation"]["rounds"] = 1
    grid = FakeGrid(sites(tmp_path, partition_dir))
    replies = []
    grid.tamper = {101: replies.append}
    config = run_config(tmp_path, raw, partition_dir)
    serve(grid, config)
    state = state_of(tmp_path, "client-0")
    spent = storage.latest_state(state).manifest.privacy
    # No reply names a loss: not the update's manifest, not Flower's records.
    (reply,) = [r for r in replies if "update.text" in r.content]
    assert json.loads(reply.content["update.text"]["update.json"])["loss"] is None
    assert all("loss" not in key for record in reply.content.values() for key in record)
    # The coordinator lost round 1 (say, its disk) and asks again.
    layout = RunLayout(tmp_path / "run")
    shutil.rmtree(layout.global_checkpoint(1))
    shutil.rmtree(layout.root / "updates")
    replies.clear()
    serve(grid, config)
    (reply,) = [r for r in replies if "update.text" in r.content]
    assert reply.content[client_app.REPLY][client_app.RESENT_KEY] is True
    assert storage.latest_state(state).manifest.privacy == spent
    assert len(spent["history"]) == 1


def test_the_round_table_shows_the_epsilon_the_sites_report(tmp_path, tiny_model_dir, reviews_csv, partition_dir):
    raw = private_recipe(tiny_model_dir, reviews_csv, noise_multiplier=1.0)
    raw["federation"]["rounds"] = 1
    said = []
    rows = server_app.Coordinator(FakeGrid(sites(tmp_path, partition_dir)), server_app.Settings.from_run_config(
        run_config(tmp_path, raw, partition_dir)), lambda level, text: said.append(text)).run()
    spent = max(storage.latest_state(state_of(tmp_path, f"client-{i}")).manifest.privacy["epsilon"] for i in range(3))
    assert rows[0]["epsilon"] == pytest.approx(spent)
    table = [t for t in said if t.startswith("round 1 done")][-1]
    assert "max eps" in table and f"{spent:.3f}" in table and "server eps" not in table


def test_the_sites_scores_of_the_global_reach_the_round_table(tmp_path, tiny_model_dir, reviews_csv, partition_dir):
    raw = recipe_dict(tiny_model_dir, reviews_csv)
    raw["federation"]["rounds"] = 1
    grid = FakeGrid(sites(tmp_path, partition_dir, **{"test-data": str(partition_dir / TEST_SHARD)}))
    config = run_config(tmp_path, raw, partition_dir, **{"client-evaluation": True})
    del config["test"]  # the coordinator holds no test data of its own: the sites' scores are all there is
    (tmp_path / "run").mkdir()
    said = []
    rows = server_app.Coordinator(grid, server_app.Settings.from_run_config(config),
                                  lambda level, text: said.append(text)).run()
    scores = json.loads(RunLayout(tmp_path / "run").metrics(1).read_text())["sites"]
    assert sorted(scores) == ["client-0", "client-1", "client-2"]
    assert rows[0]["sites_accuracy"] == pytest.approx(sum(s["global.accuracy"] for s in scores.values()) / 3)
    table = [t for t in said if t.startswith("round 1 done")][-1]
    assert "sites acc" in table and f"{rows[0]['sites_accuracy']:.4f}" in table


def test_the_global_and_the_sites_are_scored_on_validation_as_simulate_scores_them(tmp_path, tiny_model_dir,
                                                                                reviews_csv, partition_dir):
    raw = recipe_dict(tiny_model_dir, reviews_csv)
    raw["federation"]["rounds"] = 1
    # Each site names its own validation data (here: its own training shard, to tell it from the coordinator's).
    nodes = sites(tmp_path, partition_dir, **{"test-data": str(partition_dir / TEST_SHARD)})
    for config in nodes.values():
        config["validation-data"] = config["data"]
    grid = FakeGrid(nodes)
    config = run_config(tmp_path, raw, partition_dir, **{"client-evaluation": True,
                                                         "validation": str(partition_dir / VALIDATION_SHARD)})
    (tmp_path / "run").mkdir()
    said = []
    rows = server_app.Coordinator(grid, server_app.Settings.from_run_config(config),
                                  lambda level, text: said.append(text)).run()
    metrics = json.loads(RunLayout(tmp_path / "run").metrics(1).read_text())
    g1 = RunLayout(tmp_path / "run").global_checkpoint(1)
    by_hand = federation.evaluate(g1, partition_dir, held_out="validation")
    assert metrics["validation"]["global"]["accuracy"] == pytest.approx(by_hand["accuracy"])
    assert rows[0]["validation_global_accuracy"] == pytest.approx(by_hand["accuracy"])
    own = {cid: federation.evaluate(g1, partition_dir / shard_name(cid))["accuracy"] for cid in metrics["sites"]}
    assert {cid: s["global.accuracy"] for cid, s in metrics["validation"]["sites"].items()} == pytest.approx(own)
    assert not any(k.startswith("validation.") for s in metrics["sites"].values() for k in s)
    assert rows[0]["validation_sites_accuracy"] == pytest.approx(sum(own.values()) / 3)
    table = [t for t in said if t.startswith("round 1 done")][-1]
    assert "val acc" in table and f"{rows[0]['validation_global_accuracy']:.4f}" in table


def test_a_site_back_as_a_new_node_takes_its_id_over(tmp_path, tiny_model_dir, reviews_csv, partition_dir):
    raw = recipe_dict(tiny_model_dir, reviews_csv)
    raw["federation"].update(rounds=1, min_clients=3)
    grid = FakeGrid(sites(tmp_path, partition_dir))
    said = []
    coordinator = server_app.Coordinator(grid, server_app.Settings.from_run_config(run_config(tmp_path, raw, partition_dir)),
                                         lambda level, text: said.append(text))
    # client-2 was node 99, which restarted without SuperNode authentication and came back as node 103.
    coordinator.clients = {101: "client-0", 102: "client-1", 99: "client-2"}
    # Execute
    rows = coordinator.run()
    # Assert
    assert coordinator.clients == {101: "client-0", 102: "client-1", 103: "client-2"}
    assert "site 'client-2' is back as node 103 (node 99 is gone)" in said
    assert rows[0]["clients"] == 3 and grid.trained() == [101, 102, 103]


def test_a_site_with_another_base_model_is_refused_before_it_trains(tmp_path, tiny_model_dir, reviews_csv,
                                                                    partition_dir, tmp_path_factory):
    from transformers import BertForSequenceClassification

    other = tmp_path_factory.mktemp("other-bert")
    shutil.copytree(tiny_model_dir, other, dirs_exist_ok=True)
    model = BertForSequenceClassification.from_pretrained(other)
    for weight in model.parameters():  # a fine-tune of the same architecture: every weight moved
        weight.data += 0.5
    model.save_pretrained(other)
    nodes = sites(tmp_path, partition_dir)
    nodes[102]["base"] = str(other)
    grid = FakeGrid(nodes)
    said = []
    config = run_config(tmp_path, recipe_dict(tiny_model_dir, reviews_csv), partition_dir)
    coordinator = server_app.Coordinator(grid, server_app.Settings.from_run_config(config),
                                         lambda level, text: said.append(text))
    coordinator.run()
    assert 102 not in grid.trained() and grid.trained() == [101, 103] * 2
    expected = storage.read_global(RunLayout(tmp_path / "run").global_checkpoint(0)).manifest.base_fingerprint
    assert [t for t in said if "refused" in t] == [
        (f"site 'client-1' (node 102) refused: its base model (fingerprint {_fingerprint(said)}) is not the "
         f"federation's ({expected}); it will not be asked to train")
    ]
    assert _fingerprint(said) != expected
    assert not (tmp_path / "sites" / "client-1").exists()


def _fingerprint(said: list[str]) -> str:
    line = next(t for t in said if "refused" in t)
    return line.split("fingerprint ")[1].split(")")[0]


def test_a_dead_node_is_left_out_and_below_min_clients_the_round_fails_writing_nothing(
        tmp_path, tiny_model_dir, reviews_csv, partition_dir):
    raw = recipe_dict(tiny_model_dir, reviews_csv)
    raw["federation"]["rounds"] = 1
    grid = FakeGrid(sites(tmp_path, partition_dir))
    grid.silent = {103}
    said = []
    config = run_config(tmp_path, raw, partition_dir)
    coordinator = server_app.Coordinator(grid, server_app.Settings.from_run_config(config),
                                         lambda level, text: said.append(text))
    # A node that said who it is and then died (or is too slow): the round goes on with the other two.
    coordinator.clients = {101: "client-0", 102: "client-1", 103: "client-2"}
    coordinator.run()
    layout = RunLayout(tmp_path / "run")
    assert storage.read_global(layout.global_checkpoint(1)).manifest.clients == ["client-0", "client-1"]
    assert "round 1: client 'client-2' sent no reply within 30 s; left out" in said
    # With min_clients 3 the same round fails in one line and writes nothing.
    raw["federation"]["min_clients"] = 3
    (tmp_path / "strict").mkdir()
    config = run_config(tmp_path / "strict", raw, partition_dir)
    grid = FakeGrid(sites(tmp_path / "strict", partition_dir))
    grid.silent = {103}
    coordinator = server_app.Coordinator(grid, server_app.Settings.from_run_config(config), lambda *a: None)
    coordinator.clients = {101: "client-0", 102: "client-1", 103: "client-2"}
    with pytest.raises(FedloraError, match=r"^round 1: 2 client update\(s\) of 3 asked, fewer than "
                                           r"federation.min_clients = 3; nothing written$"):
        coordinator.run()
    strict = RunLayout(tmp_path / "strict" / "run")
    assert [p.name for p in strict.global_checkpoints()] == ["round-000"]
    assert not (strict.root / "updates").exists()
    assert not any((strict.root / rounds.STAGING_DIR).rglob("*.json"))


def test_a_node_gone_mid_round_is_left_out_with_flowers_reason(tmp_path, tiny_model_dir, reviews_csv, partition_dir):
    raw = recipe_dict(tiny_model_dir, reviews_csv)
    raw["federation"]["rounds"] = 1
    grid = FakeGrid(sites(tmp_path, partition_dir))
    grid.gone = {103}
    said = []
    coordinator = server_app.Coordinator(grid, server_app.Settings.from_run_config(run_config(tmp_path, raw, partition_dir)),
                                         lambda level, text: said.append(text))
    coordinator.clients = {101: "client-0", 102: "client-1", 103: "client-2"}
    # Execute
    rows = coordinator.run()
    # Assert: the SuperLink's reply for the node is matched to the message it answers, and its reason named
    (line,) = [t for t in said if t.startswith("round 1: client 'client-2'")]
    assert line == f"round 1: client 'client-2' failed (Flower error {ErrorCode.NODE_UNAVAILABLE}: Node is unavailable); left out"
    assert rows[0]["left_out"] == ["client-2"] and rows[0]["clients"] == 2


def test_without_sampling_a_round_asks_the_population_not_the_nodes_online(tmp_path, tiny_model_dir, reviews_csv,
                                                                          partition_dir):
    """Issue 26 (by hand, on main then): the round after a site died showed 2/2, left out '-', as if the federation
    were whoever is online. Here client-2's node is known from round 1 and offline in round 2."""
    raw = recipe_dict(tiny_model_dir, reviews_csv)
    grid = FakeGrid(sites(tmp_path, partition_dir))
    said = []
    coordinator = server_app.Coordinator(grid, server_app.Settings.from_run_config(
        run_config(tmp_path, raw, partition_dir)), lambda level, text: said.append(text))
    coordinator.clients = {101: "client-0", 102: "client-1", 103: "client-2"}
    online = grid.get_node_ids
    grid.get_node_ids = lambda: [n for n in online() if n != 103 or not grid.trained()]  # gone after round 1
    rows = coordinator.run()
    assert [(row["clients"], row["asked"], row["left_out"]) for row in rows] == [(3, 3, []), (2, 3, ["client-2"])]
    assert "round 2: client 'client-2' has no SuperNode online; left out" in said
    table = [t for t in said if t.startswith("round 2 done")][-1]
    assert re.search(r"\b2\s+│\s+2/3\s+│\s+client-2\s+│", table), table
    written = storage.read_global(RunLayout(tmp_path / "run").global_checkpoint(2)).manifest
    # asked None: every client of the federation was asked (sampled rounds list whom they asked).
    assert written.clients == ["client-0", "client-1"] and written.asked is None


def test_a_node_gone_before_it_says_who_it_is_or_evaluates_is_named_with_flowers_reason(tmp_path, tiny_model_dir,
                                                                                        reviews_csv, partition_dir):
    """Flower's NODE_UNAVAILABLE reply comes from the SuperLink, not the node: the query and the evaluate message
    match it to the message it answers, as training does (issue 26: the reason was dropped)."""
    raw = recipe_dict(tiny_model_dir, reviews_csv)
    raw["federation"]["rounds"] = 1
    reason = f"Flower error {ErrorCode.NODE_UNAVAILABLE}: Node is unavailable"
    said = []
    asked = tmp_path / "asked-who"
    asked.mkdir()
    grid = FakeGrid(sites(asked, partition_dir))
    grid.gone = {103}
    server_app.Coordinator(grid, server_app.Settings.from_run_config(run_config(asked, raw, partition_dir)),
                           lambda level, text: said.append(text)).run()
    assert f"node 103: no answer to who it is ({reason}); asked again next round" in said
    said.clear()
    grid = FakeGrid(sites(tmp_path, partition_dir, **{"test-data": str(partition_dir / TEST_SHARD)}))
    coordinator = server_app.Coordinator(grid, server_app.Settings.from_run_config(
        run_config(tmp_path, raw, partition_dir, **{"client-evaluation": True})), lambda level, text: said.append(text))
    coordinator.clients = {101: "client-0", 102: "client-1", 103: "client-2"}
    grid.gone = {103}
    coordinator.run()
    assert f"round 1: client 'client-2' failed ({reason}); left out" in said
    assert f"client 'client-2' failed ({reason})" in said  # its evaluation of round 1's global


def test_an_update_failing_validation_is_refused_by_name_and_the_round_goes_on(tmp_path, tiny_model_dir,
                                                                               reviews_csv, partition_dir):
    raw = recipe_dict(tiny_model_dir, reviews_csv)
    raw["federation"]["rounds"] = 1

    def claims_round_7(reply):
        if "update.text" not in reply.content:
            return  # the query's answer
        manifest = json.loads(reply.content["update.text"]["update.json"])
        manifest["round"] = 7
        reply.content["update.text"]["update.json"] = json.dumps(manifest)

    grid = FakeGrid(sites(tmp_path, partition_dir))
    grid.tamper = {102: claims_round_7}
    said = []
    coordinator = server_app.Coordinator(grid, server_app.Settings.from_run_config(
        run_config(tmp_path, raw, partition_dir)), lambda level, text: said.append(text))
    coordinator.run()
    layout = RunLayout(tmp_path / "run")
    assert storage.read_global(layout.global_checkpoint(1)).manifest.clients == ["client-0", "client-2"]
    (line,) = [t for t in said if "refused" in t]
    assert line.startswith("round 1: update of client 'client-1' refused: client update ")
    assert "is for round 7; this aggregation makes round 1; left out" in line
    assert not layout.update(1, "client-1").exists()


def test_a_site_without_data_says_so_and_the_server_names_it(tmp_path, tiny_model_dir, reviews_csv, partition_dir):
    raw = recipe_dict(tiny_model_dir, reviews_csv)
    raw["federation"]["rounds"] = 1
    nodes = sites(tmp_path, partition_dir)
    del nodes[103]["data"]
    grid = FakeGrid(nodes)
    said = []
    server_app.Coordinator(grid, server_app.Settings.from_run_config(run_config(tmp_path, raw, partition_dir)),
                           lambda level, text: said.append(text)).run()
    assert ("round 1: client 'client-2' did not train: site 'client-2' has no data=\"...\" in its --node-config; "
            "it cannot train; left out") in said


def test_the_run_config_is_checked():
    with pytest.raises(FedloraError, match="the run config lacks 'run-dir'"):
        server_app.Settings.from_run_config({"recipe": "r.yaml"})
    with pytest.raises(FedloraError, match="'round-timeout' must be a positive number"):
        server_app.Settings.from_run_config({"recipe": "r.yaml", "run-dir": "run", "round-timeout": 0})


def test_report_to_logs_each_rounds_row_under_simulates_names(tmp_path, tiny_model_dir, reviews_csv, partition_dir):
    from tracking.helpers import tensorboard_scalars

    # Prepare
    grid = FakeGrid(sites(tmp_path, partition_dir))
    raw = recipe_dict(tiny_model_dir, reviews_csv)
    config = run_config(tmp_path, raw, partition_dir, **{"report-to": "tensorboard"})
    # Execute
    rows = server_app.Coordinator(grid, server_app.Settings.from_run_config(config), lambda *a: None).run()
    # Assert: the event files in the run folder's tracking dir hold each round's global accuracy the server logged
    scalars = tensorboard_scalars(tmp_path / "run" / "tracking" / "tensorboard" / "tiny-fedavg" / "run")
    assert [r["round"] for r in rows] == [1, 2] and all(r["global_accuracy"] is not None for r in rows)
    assert scalars["round/global_accuracy"] == [(r["round"], pytest.approx(r["global_accuracy"])) for r in rows]
    assert scalars["round/train_loss"] == [(r["round"], pytest.approx(r["train_loss"])) for r in rows]
    assert scalars["round/clients"] == [(1, 3.0), (2, 3.0)]


def test_report_to_never_logs_a_dp_sgd_clients_loss_and_refuses_an_unknown_tracker(tmp_path, tiny_model_dir,
                                                                                   reviews_csv, partition_dir):
    from tracking.helpers import tensorboard_scalars

    raw = private_recipe(tiny_model_dir, reviews_csv, noise_multiplier=1.0)
    raw["federation"]["rounds"] = 1
    config = run_config(tmp_path, raw, partition_dir, **{"report-to": "tensorboard"})
    server_app.Coordinator(FakeGrid(sites(tmp_path, partition_dir)), server_app.Settings.from_run_config(config),
                           lambda *a: None).run()
    (events,) = (tmp_path / "run" / "tracking" / "tensorboard").glob("*/run")
    tags = set(tensorboard_scalars(events))
    assert "round/global_accuracy" in tags and "round/epsilon" in tags
    assert not any("loss" in tag and "global" not in tag for tag in tags), tags
    with pytest.raises(FedloraError, match="--report-to: unknown tracker 'tensorbored'"):
        server_app.Coordinator(FakeGrid({}),
                               server_app.Settings.from_run_config({**config, "report-to": "tensorbored"}))


def test_int8_updates_travel_through_flower_and_aggregate_as_by_hand(tmp_path, tiny_model_dir, reviews_csv,
                                                                      partition_dir):
    """federation.update_encoding int8: the sites send codes and scales, the server app decodes them as `fedlora
    aggregate` does, and every site keeps its rounding error in its own state."""
    raw = recipe_dict(tiny_model_dir, reviews_csv)
    raw["federation"]["update_encoding"] = "int8"
    grid = FakeGrid(sites(tmp_path, partition_dir))

    serve(grid, run_config(tmp_path, raw, partition_dir))

    layout = RunLayout(tmp_path / "run")
    for round_ in (1, 2):
        updates = [layout.update(round_, f"client-{i}") for i in range(3)]
        assert {storage.read_update(u).manifest.encoding for u in updates} == {"int8"}
        again = federation.aggregate_round(layout.global_checkpoint(round_ - 1), updates, tmp_path / f"again-{round_}")
        assert storage.read_global(layout.global_checkpoint(round_)).manifest.digest == again.checkpoint.manifest.digest
    kept = storage.latest_state(state_of(tmp_path, "client-1")).tensors()
    assert any(name.endswith("::residual") for name in kept)


def test_two_federations_on_the_same_sites_keep_their_client_state_apart(tmp_path, tiny_model_dir, reviews_csv,
                                                                         partition_dir):
    """The same SuperNodes (the same state-dir) serve federation A, then B (another recipe): each has its own state
    folder at each site (STATE-DIR/<recipe name>-<digest>), and B is not refused for A's state."""
    from fedlora_cli.flower.site import federation_folder, manifest_of

    # Prepare
    node_configs = sites(tmp_path, partition_dir)
    runs = {}
    for name, lr in (("a", 0.01), ("b", 0.02)):
        raw = recipe_dict(tiny_model_dir, reviews_csv)
        raw["name"], raw["training"]["lr"] = f"federation-{name}", lr
        (tmp_path / name).mkdir()
        # Execute
        serve(FakeGrid(node_configs), run_config(tmp_path / name, raw, partition_dir))
        runs[name] = RunLayout(tmp_path / name / "run")
    # Assert
    for name, layout in runs.items():
        assert [p.name for p in layout.global_checkpoints()] == ["round-000", "round-001", "round-002"]
        assert storage.read_global(layout.global_checkpoint(2)).manifest.clients == ["client-0", "client-1", "client-2"]
    federations = {name: federation_folder(manifest_of(
        (layout.global_checkpoint(0) / storage.GLOBAL_MANIFEST).read_text())) for name, layout in runs.items()}
    for i in range(3):
        site = tmp_path / "sites" / f"client-{i}"
        assert sorted(p.name for p in site.iterdir() if p.name != "flower") == sorted(federations.values())
        for name in runs:
            assert storage.state_rounds(site / federations[name]) == [1, 2]


def test_a_site_that_ran_the_recipe_before_is_refused_when_identified_and_no_site_trains_a_doomed_round(
        tmp_path, tiny_model_dir, reviews_csv, partition_dir):
    """Every client must take part (min_clients 3). client-0 already ran this very recipe to round 2 in another run
    folder and kept its state, not the updates it sent; a fresh run of the recipe asks it to start over from round
    0. client-0 is refused when it says who it is, so the round is short of clients before anyone trains: client-1
    and client-2 spend nothing on it. (Had it kept its round-1 update, made from the same round-0 global, it would
    send it again: a replayed run.)"""
    raw = recipe_dict(tiny_model_dir, reviews_csv)
    raw["federation"]["min_clients"] = 3
    (tmp_path / "first").mkdir()
    serve(FakeGrid(sites(tmp_path / "first", partition_dir)), run_config(tmp_path / "first", raw, partition_dir))
    shutil.rmtree(tmp_path / "first" / "sites" / "client-0" / "flower")  # its work folder: received and sent
    (tmp_path / "second").mkdir()
    nodes = sites(tmp_path / "second", partition_dir)
    nodes[101]["state-dir"] = str(tmp_path / "first" / "sites" / "client-0")
    grid, said = FakeGrid(nodes), []
    coordinator = server_app.Coordinator(grid, server_app.Settings.from_run_config(
        run_config(tmp_path / "second", raw, partition_dir)), lambda level, text: said.append(text))
    # Execute
    with pytest.raises(FedloraError, match=r"^round 1: 2 of the 3 client\(s\) asked are online or done, fewer than "
                                           r"federation.min_clients = 3; nothing written$"):
        coordinator.run()
    # Assert
    ahead = state_of(tmp_path / "first", "client-0")
    assert (f"site 'client-0' (node 101) refused: client state {ahead} is at round 2, ahead of this federation's "
            "global checkpoint (round 0), with no update of round 1 from it to send again: this site ran this recipe "
            "before; resume that run, or give the site a new state-dir; it will not be asked to train") in said
    assert grid.trained() == []
    assert not (tmp_path / "second" / "sites" / "client-1").exists()
    assert storage.state_rounds(ahead) == [1, 2]


def test_a_state_dir_holding_one_federations_rounds_directly_is_refused_with_where_to_move_them(
        tmp_path, tiny_model_dir, reviews_csv, partition_dir):
    from fedlora_cli.flower.site import SiteConfig, check_ready, federation_folder, manifest_of

    raw = recipe_dict(tiny_model_dir, reviews_csv)
    raw["federation"]["rounds"] = 1
    serve(FakeGrid(sites(tmp_path, partition_dir)), run_config(tmp_path, raw, partition_dir))
    own = state_of(tmp_path, "client-0")
    old = tmp_path / "old-site"
    shutil.copytree(own, old)  # the layout a site had before: rounds right in the state-dir
    manifest = manifest_of((RunLayout(tmp_path / "run").global_checkpoint(1) / storage.GLOBAL_MANIFEST).read_text())
    site = SiteConfig.from_node_config({"client-id": "client-0", "state-dir": str(old)})
    with pytest.raises(FedloraError, match=rf"^{re.escape(str(old))} holds client state rounds directly, written "
                                           r"before fedlora kept a folder per federation: move its round-\* folders "
                                           rf"into {re.escape(str(old))}/<recipe name>-<digest>/ \(this federation's "
                                           rf"is {federation_folder(manifest)}, if they are of this recipe\)$"):
        check_ready(site, manifest)


def test_a_poisson_round_that_asks_nobody_is_skipped_and_the_run_goes_on(tmp_path, tiny_model_dir, reviews_csv,
                                                                         partition_dir):
    """Issue 28: the round's seeded sample asked nobody, which used to stop the run for good; it is skipped (the
    global carried forward, nobody asked to train) and round 2 trains, as simulate and fedlora aggregate do."""
    from federation.test_rounds import empty_first_round

    grid = FakeGrid(sites(tmp_path, partition_dir))
    serve(grid, run_config(tmp_path, empty_first_round(tiny_model_dir, reviews_csv), partition_dir))
    layout = RunLayout(tmp_path / "run")
    g0, g1, g2 = (storage.read_global(layout.global_checkpoint(r)).manifest for r in (0, 1, 2))
    assert g1.aggregation["strategy"] == "skipped" and g1.tensor_digests == g0.tensor_digests
    assert len(grid.trained()) == len(g2.clients) == len(g2.asked) >= 1  # only round 2 asked anybody to train


def test_a_failing_server_app_leaves_one_line_and_no_flower_traceback(tmp_path, caplog):
    """Issue 28: Flower's flwr-serverapp logs an exception the ServerApp raises with its traceback, after
    fedlora's own line. Here its handler is run as flwr-serverapp runs it (run_serverapp.py)."""
    from logging import ERROR

    from flwr.common.logger import log

    grid = FakeGrid({})
    try:
        serve(grid, {"recipe": str(tmp_path / "nowhere.yaml")})
    except Exception as ex:  # what flwr-serverapp does with it
        log(ERROR, "%s raised an exception", "ServerApp", exc_info=ex)
    else:
        raise AssertionError("the server app did not fail")
    said = [r.getMessage() for r in caplog.records]
    assert said == ["fedlora: the run config lacks 'run-dir' (write the app folder with 'fedlora flower app')"], said
    assert not any(r.exc_info for r in caplog.records)
    # Any other exception keeps Flower's report and its traceback.
    log(ERROR, "%s raised an exception", "ServerApp", exc_info=ValueError("not fedlora's"))
    assert caplog.records[-1].exc_info is not None


def test_the_privacy_report_says_when_a_sites_epsilon_counts_a_round_trained_past_the_deadline(
        tmp_path, tiny_model_dir, reviews_csv, partition_dir):
    """Issue 28: a site that trained past the round's deadline counts the round in its ledger though the coordinator
    never aggregated its update: safe, and the report now says so."""
    from cli.helpers import ok

    grid = FakeGrid(sites(tmp_path, partition_dir))
    grid.late = {101}
    serve(grid, run_config(tmp_path, private_recipe(tiny_model_dir, reviews_csv, noise_multiplier=1.0), partition_dir))
    layout = RunLayout(tmp_path / "run")
    assert "client-0" not in storage.read_global(layout.global_checkpoint(1)).manifest.clients
    state = state_of(tmp_path, "client-0")
    (entry,) = json.loads(ok(["privacy", "report", state, "--json"]))
    assert len(entry["history"]) == 2 and entry["not_aggregated"] == [1]
    said = " ".join(ok(["privacy", "report", state]).split())
    assert "counts round(s) 1, whose global checkpoint did not aggregate" in said and "over-count" in said
