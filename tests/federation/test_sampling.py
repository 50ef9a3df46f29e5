"""Which clients a round asks: seeded, sized, recorded; the clients that sit a round out."""

from __future__ import annotations

from conftest import QuietReporter, folder_digest, run
from typer.testing import CliRunner

from fedlora_cli import recipe as recipes, storage
from fedlora_cli.federation import sampling, simulate

runner = CliRunner()


def test_sampling_is_seeded_sized_and_differs_between_rounds(scaled):
    f = scaled(clients=3).federation
    f = recipes.FederationSection(**{**f.__dict__, "clients": 10, "clients_per_round": 4})
    first = [sampling.asked(f, seed=0, round_=r) for r in range(1, 6)]
    assert first == [sampling.asked(f, seed=0, round_=r) for r in range(1, 6)]
    assert all(len(a) == 4 and len(set(a)) == 4 for a in first)
    assert len({tuple(a) for a in first}) > 1, "every round drew the same clients"
    assert first != [sampling.asked(f, seed=1, round_=r) for r in range(1, 6)]
    ids = sampling.population(f)
    assert all(a == sorted(a, key=ids.index) for a in first)  # population order


def test_poisson_sampling_asks_each_client_at_the_rate():
    f = recipes.FederationSection(clients=200, clients_per_round=50, sampling="poisson")
    counts = [len(sampling.asked(f, seed=0, round_=r)) for r in range(1, 41)]
    assert sampling.sample_rate(f) == 0.25
    assert 45 < sum(counts) / len(counts) < 55 and len(set(counts)) > 1  # about q N, not a fixed size


def test_a_sampled_run_trains_only_the_asked_clients_and_records_them(scaled, tmp_path):
    recipe = scaled(clients=3, clients_per_round=2)
    layout = run(recipe, tmp_path / "run")
    for round_ in (1, 2):
        m = storage.read_global(layout.global_checkpoint(round_)).manifest
        expected = sampling.asked(recipe.federation, recipe.training.seed, round_)
        assert m.asked == expected and m.clients == expected and len(expected) == 2
        trained = sorted(p.name for p in (layout.root / "updates" / storage.round_dirname(round_)).iterdir())
        assert trained == expected


def test_a_client_that_sits_a_round_out_keeps_its_state_untouched(scaled, tmp_path):
    recipe = scaled("fedsa", clients=3, clients_per_round=2, rounds=3)  # FedSA: each client keeps its own B
    root = tmp_path / "run"
    snapshots = {}

    class Snapshot(QuietReporter):
        def round_done(self, row):
            states = root / storage.CLIENTS_DIR
            snapshots[row["round"]] = {d.name: folder_digest(d) for d in states.iterdir()} if states.is_dir() else {}

    simulate.simulate(recipe, root, Snapshot())
    for r in (2, 3):
        asked = sampling.asked(recipe.federation, recipe.training.seed, r)
        for cid, digest in snapshots[r - 1].items():
            if cid in asked:
                assert snapshots[r][cid] != digest, f"{cid} was asked in round {r} but its state did not change"
            else:
                assert snapshots[r][cid] == digest, f"{cid} sat round {r} out but its state changed"
    idle = [(r, c) for r in (2, 3) for c in snapshots[r - 1] if c not in sampling.asked(recipe.federation, 0, r)]
    assert idle, "no client sat a round out in this draw"
