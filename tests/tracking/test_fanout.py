"""fedlora_cli.tracking.fanout: choosing trackers (by option or recipe, each checked before any work), and the
fan-out that opens them at the first metric and logs a round once."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest

from fedlora_cli import recipe as recipes
from fedlora_cli.errors import FedloraError
from fedlora_cli.tracking import fanout
from fedlora_cli.tracking.fanout import BACKENDS, Trackers, coordinator_home, log_client_round, log_evaluation, resolve


class Recorder:
    """A tracker that records what it is given."""

    def __init__(self, run, directory, fail_close=False):
        self.run, self.directory, self.fail_close = run, directory, fail_close
        self.logged, self.closed = [], False

    def log_metrics(self, step, metrics):
        self.logged.append((step, dict(metrics)))

    def close(self):
        self.closed = True
        if self.fail_close:
            raise RuntimeError("close failed")


@pytest.fixture
def recorders(monkeypatch):
    """Two fake backends in place of the real ones; the trackers they open, by name."""
    opened = {}

    def backend(name, **options):
        def make(run, directory):
            opened[name] = Recorder(run, directory, **options)
            return opened[name]
        return fanout.Backend(name, name, "json", "json", name, make)  # 'json' is always importable

    monkeypatch.setitem(BACKENDS, "tensorboard", backend("tensorboard", fail_close=True))
    monkeypatch.setitem(BACKENDS, "mlflow", backend("mlflow"))
    return opened


def test_resolve_reads_the_option_over_the_recipe(make_recipe):
    r = make_recipe()
    assert resolve(None, r) == () and resolve(None) == ()
    tracked = recipes.from_dict({**r.to_dict(), "tracking": {"report_to": ["tensorboard", "wandb"]}})
    assert resolve(None, tracked) == ("tensorboard", "wandb")
    assert resolve("MLflow, tensorboard,mlflow", tracked) == ("mlflow", "tensorboard")  # the option wins, once each
    assert resolve("none", tracked) == ()
    with pytest.raises(FedloraError, match=r"--report-to: unknown tracker 'tb' \(known: tensorboard, mlflow, wandb, or none\)"):
        resolve("tb")


def test_a_missing_tracker_package_is_refused_naming_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(FedloraError) as caught:
        resolve("tensorboard,wandb")
    assert str(caught.value) == ("tracker 'wandb' needs the wandb package, which is not installed: "
                                 "pip install 'fedlora[wandb]'")


def test_nothing_opens_before_the_first_metric_then_every_tracker_gets_it(tmp_path, recorders):
    with Trackers(("tensorboard", "mlflow"), tmp_path / "run", "exp") as trackers:
        trackers.log_metrics(1, {})
        assert not (tmp_path / "run").exists() and not recorders
        trackers.log_metrics(3, {"step/client-0/train_loss": 0.5})
        assert recorders["mlflow"].logged == recorders["tensorboard"].logged == [(3, {"step/client-0/train_loss": 0.5})]
        assert recorders["mlflow"].directory == tmp_path / "run" / "tracking"
        assert recorders["mlflow"].run.experiment == "exp" and recorders["mlflow"].run.name == "run"
        with pytest.raises(RuntimeError, match="close failed"):
            trackers.close()
    assert recorders["mlflow"].closed and recorders["tensorboard"].closed  # one failing close does not stop the other
    assert not Trackers((), tmp_path / "x", "exp") and Trackers(("mlflow",), tmp_path / "x", "exp")


def test_a_round_is_logged_once_per_tracker_across_resumed_runs(tmp_path, recorders, monkeypatch):
    monkeypatch.setattr(Recorder, "close", lambda self: None)
    first = Trackers(("mlflow",), tmp_path, "exp", directory=tmp_path / "elsewhere")
    for round_ in (1, 2):
        first.log_round(round_, {"round/global_accuracy": round_ / 10})
    first.close()
    resumed = Trackers(("mlflow", "tensorboard"), tmp_path, "exp")  # a resumed run reports rounds 1 to 3 again
    for round_ in (1, 2, 3):
        resumed.log_round(round_, {"round/global_accuracy": round_ / 10})
    assert recorders["mlflow"].logged == [(3, {"round/global_accuracy": 0.3})]
    assert [step for step, _ in recorders["tensorboard"].logged] == [1, 2, 3]  # new to this tracker: all of them
    assert recorders["mlflow"].run.id == first.run.id and recorders["mlflow"].directory == tmp_path / "tracking"


def test_the_coordinator_tracks_in_the_run_its_global_checkpoints_belong_to(tmp_path):
    (tmp_path / "run" / "global" / "round-002").mkdir(parents=True)
    (tmp_path / "by-hand" / "g2").mkdir(parents=True)
    assert coordinator_home(tmp_path / "run" / "global" / "round-002") == tmp_path / "run"
    assert coordinator_home(tmp_path / "by-hand" / "g2") == tmp_path / "by-hand"


def test_an_evaluation_is_logged_at_its_round_in_the_coordinators_run_or_the_clients(tmp_path, recorders, monkeypatch):
    monkeypatch.setattr(Recorder, "close", lambda self: None)
    checkpoint = tmp_path / "run" / "global" / "round-002"
    checkpoint.mkdir(parents=True)
    scores = {"round": 2, "personalised": False, "accuracy": 0.8, "validation": {"personalised": False, "accuracy": 0.7}}
    log_evaluation(("mlflow",), scores, checkpoint, None, "exp")
    assert recorders["mlflow"].run.home == tmp_path / "run"
    assert recorders["mlflow"].logged == [(2, {"round/global_accuracy": 0.8}),
                                          (2, {"round/validation_global_accuracy": 0.7})]
    log_evaluation(("mlflow",), {"round": 2, "personalised": True, "loss": 1.5}, checkpoint, tmp_path / "state", "exp",
                   directory=tmp_path / "elsewhere")
    assert recorders["mlflow"].run.home == tmp_path / "state" and recorders["mlflow"].directory == tmp_path / "elsewhere"
    assert recorders["mlflow"].logged == [(2, {"round/personalised_loss": 1.5})]  # no validation data: none logged


def test_a_client_round_is_logged_with_the_loss_its_state_kept_and_not_when_the_update_was_sent_again(
        tmp_path, recorders, monkeypatch):
    monkeypatch.setattr(Recorder, "close", lambda self: None)
    update = SimpleNamespace(client_id="client-0", bytes=300, num_examples=24, steps=3, seconds=1.5, privacy=None)
    written = SimpleNamespace(update=SimpleNamespace(manifest=update), state=SimpleNamespace(
        manifest=SimpleNamespace(loss=0.7)), resent=True)
    with Trackers(("mlflow",), tmp_path, "exp") as tracked:
        log_client_round(tracked, 2, written)
        assert not recorders  # sent again, not trained: nothing new to log
        log_client_round(tracked, 2, SimpleNamespace(**{**vars(written), "resent": False}))
    assert recorders["mlflow"].logged == [(2, {
        "round/client-0/train_loss": 0.7, "round/client-0/upload_bytes": 300.0, "round/client-0/examples": 24.0,
        "round/client-0/steps": 3.0, "round/client-0/seconds": 1.5})]
